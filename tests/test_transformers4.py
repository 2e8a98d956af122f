"""The Llama export read by a transformers 4.x release (the project's own venv has 5.x).

transformers 4.57.6 (with the tokenizers and huggingface_hub it needs) is installed once into
a side folder, `.venv/side-transformers4` (tests/clients/side.py), and put first on PYTHONPATH of a subprocess that
reuses the main venv's torch (tests/clients/transformers4_load.py). It loads the tiny `--to
llama` export; its logits are compared with the independent InternLM2 forward
(tests/reference_internlm2.py) and its tokenizer ids with SentencePiece chunk by chunk.
If the release cannot be installed (no registry), the test is skipped and says why.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.cli_helpers import folder_weights, ok as _ok
from tests.clients.side import SideInstallFailed, transformers4
from tests.paths import BASE, ROOT
from tests.reference_internlm2 import internlm2_forward
from tests.tokenizer_oracle import chat_prompts, chunkwise_ids, write_internlm2_like_folder

def _side_install() -> Path:
    try:
        return transformers4()
    except SideInstallFailed as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def tf4(tmp_path_factory):
    side = _side_install()
    tmp = tmp_path_factory.mktemp("tf4")
    _ok("export", BASE, "--to", "llama", "--out", tmp / "llama")
    # the config as the previous export wrote it: rope settings in the 5.x form only
    old = tmp / "old-config"
    old.mkdir()
    cfg = json.loads((tmp / "llama" / "config.json").read_text())
    (old / "config.json").write_text(json.dumps({k: v for k, v in cfg.items()
                                                  if k not in ("rope_theta", "rope_scaling")}))
    # an InternLM2-like tokenizer (dummy prefix on) exported the same way
    from omgtool.ops.tokenizer_export import write_llama_tokenizer

    added = write_internlm2_like_folder(tmp / "tok-src", byte_fallback=True)
    (tmp / "tok").mkdir()
    write_llama_tokenizer(tmp / "tok-src", tmp / "tok")

    out = tmp / "out"
    out.mkdir()
    ids = torch.randint(0, 320, (2, 48), generator=torch.Generator().manual_seed(11))
    torch.save(ids, out / "input_ids.pt")
    prompts = chat_prompts(added)
    (out / "prompts.json").write_text(json.dumps(prompts))
    job = {"model": str(tmp / "llama"), "tokenizers": [str(tmp / "llama"), str(tmp / "tok")],
           "configs": [str(tmp / "llama"), str(old)], "out": str(out)}
    (tmp / "job.json").write_text(json.dumps(job))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(side), str(ROOT)]), "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1"}
    proc = subprocess.run([sys.executable, "-m", "tests.clients.transformers4_load", str(tmp / "job.json")],
                          capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "result.json").read_text())
    return {"tmp": tmp, "ids": ids, "prompts": prompts, "added": added, "result": result,
            "logits": torch.load(out / "logits.pt"), "job": job}


def test_it_is_transformers_4(tf4):
    assert tf4["result"]["transformers"].startswith("4.57.")
    assert tf4["result"]["model_class"] == "LlamaForCausalLM"


def test_transformers4_reads_the_rope_base_and_matches_the_reference(tf4):
    configs = tf4["result"]["configs"]
    now = configs[tf4["job"]["configs"][0]]
    assert now["rope_theta"] == 1e6
    assert now["rope_scaling"]["rope_type"] == "dynamic" and now["rope_scaling"]["factor"] == 2.0
    # the 5.x-only form is what 4.x silently read as base 10000
    assert configs[tf4["job"]["configs"][1]]["rope_theta"] == 10000.0

    want = internlm2_forward(folder_weights(BASE), json.loads((BASE / "config.json").read_text()), tf4["ids"])
    got = tf4["logits"]
    rel = float((got - want).norm() / want.norm())
    assert rel < 1e-5, rel


def test_transformers4_tokenizes_as_training(tf4):
    import sentencepiece

    tokenizers = tf4["result"]["tokenizers"]
    tok = tokenizers[tf4["job"]["tokenizers"][1]]
    assert tok["class"] == "PreTrainedTokenizerFast" and tok["bos"] == 1
    sp = sentencepiece.SentencePieceProcessor(model_file=str(tf4["tmp"] / "tok-src" / "tokenizer.model"))
    for text, got in zip(tf4["prompts"], tok["ids"]):
        assert got == chunkwise_ids(sp, text, tf4["added"]), text
    # the tiny fixture's own tokenizer: 4.x and 5.x give the same ids
    from transformers import AutoTokenizer

    tok5 = AutoTokenizer.from_pretrained(str(tf4["tmp"] / "llama"))
    for text, got in zip(tf4["prompts"], tokenizers[tf4["job"]["tokenizers"][0]]["ids"]):
        assert got == tok5.encode(text, add_special_tokens=False), text
