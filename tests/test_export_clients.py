"""Exports that every client reads the same way.

- config.json of `--to llama` read as transformers 4.x reads it (its own keys, its defaults),
  and as transformers 5.x reads it, give one rope base and scaling;
- `--to peft`: base export + adapter (unmerged) equals the InternLM2 base + the checkpoint's
  unmerged LoRA within float32 rounding (oracle: tests/reference_internlm2.py);
- stage inference from prefixes and the merge plan's wording for trained tensors.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
import transformers  # noqa: F401  (its logger binds to the real stderr before CliRunner swaps it)

from tests.cli_helpers import folder_weights, ok as _ok
from tests.paths import BASE, FINETUNE, PRETRAIN, SPEC
from tests.reference_internlm2 import internlm2_forward

P = "llm.base_model.model."
SCALE = SPEC["lora_alpha"] / SPEC["lora_rank"]
ROWS = 324


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want.double()).norm() / want.double().norm())


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("clients")
    _ok("export", BASE, "--to", "llama", "--out", tmp / "base-llama")
    _ok("export", FINETUNE, "--to", "peft", "--base-llama", tmp / "base-llama", "--out", tmp / "adapter")
    _ok("export", FINETUNE, "--to", "peft", "--base-llama", tmp / "base-llama", "--out", tmp / "adapter-bf16",
        "--dtype", "bf16")
    return tmp


# --- config.json: transformers 4.x and 5.x -----------------------------------------------

def _read_rope_as_transformers4(cfg: dict) -> tuple[float, dict | None]:
    """What transformers 4.45-4.57 LlamaConfig takes from config.json: `rope_theta` (default
    10000 when absent) and `rope_scaling` with `rope_type` (or the older `type`)."""
    theta = float(cfg.get("rope_theta", 10000.0))
    scaling = cfg.get("rope_scaling")
    if scaling is not None:
        scaling = {"rope_type": scaling.get("rope_type", scaling.get("type")), "factor": scaling.get("factor")}
    return theta, scaling


def test_config_rope_reads_the_same_in_transformers_4_and_5(exports):
    from transformers import AutoConfig

    src = json.loads((BASE / "config.json").read_text())
    cfg = json.loads((exports / "base-llama" / "config.json").read_text())
    theta4, scaling4 = _read_rope_as_transformers4(cfg)
    assert theta4 == float(src["rope_theta"]) == 1e6
    assert scaling4 == {"rope_type": "dynamic", "factor": 2.0}
    # transformers 5.x: rope_parameters, and what the installed LlamaConfig makes of the file
    assert cfg["rope_parameters"] == {"rope_type": "dynamic", "rope_theta": 1e6, "factor": 2.0}
    loaded = AutoConfig.from_pretrained(str(exports / "base-llama"))
    rope = getattr(loaded, "rope_parameters", None) or {**(loaded.rope_scaling or {}), "rope_theta": loaded.rope_theta}
    assert float(rope["rope_theta"]) == 1e6 and rope["rope_type"] == "dynamic" and rope["factor"] == 2.0
    assert cfg["torch_dtype"] == cfg["dtype"] == "bfloat16"
    assert cfg["_name_or_path"] == "base-llama"  # llama.cpp's general.name comes from it


def test_config_without_rope_scaling_or_theta(tmp_path):
    """An InternLM2 config with neither key: InternLM2's default base 10000 written out, no
    scaling in either form."""
    from omgtool.arch.convert import conversion_between, llama_config_dict

    src = {k: v for k, v in json.loads((BASE / "config.json").read_text()).items()
           if k not in ("rope_theta", "rope_scaling")}
    cfg = llama_config_dict(src, conversion_between("internlm2", "llama"))
    assert _read_rope_as_transformers4(cfg) == (10000.0, None)
    assert cfg["rope_parameters"] == {"rope_type": "default", "rope_theta": 10000.0}


def test_rope_base_decides_the_logits(exports):
    """The 4.x reading matters: a config read with the wrong base (10000, what 4.x used before)
    gives logits far from the InternLM2 reference, the written one matches it."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    folder = exports / "base-llama"
    base_w = folder_weights(BASE)
    src = json.loads((BASE / "config.json").read_text())
    ids = torch.randint(0, 320, (1, 64), generator=torch.Generator().manual_seed(5))
    want = internlm2_forward(base_w, src, ids)
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    cfg = json.loads((folder / "config.json").read_text())
    wrong_cfg = {k: v for k, v in cfg.items() if k not in ("rope_theta", "rope_scaling", "rope_parameters")}
    wrong = AutoModelForCausalLM.from_pretrained(str(folder), config=LlamaConfig(**wrong_cfg),
                                                 dtype=torch.float32).eval()
    with torch.no_grad():
        got, bad = model(ids).logits, wrong(ids).logits
    assert _rel(got, want) < 1e-5
    assert _rel(bad, want) > 100 * _rel(got, want) + 1e-3


# --- --to peft: the folded lm_head stays float32 -----------------------------------------

def _adapter_logits(exports, adapter: str, ids: torch.Tensor) -> torch.Tensor:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(exports / "base-llama"), dtype=torch.float32)
    base.resize_token_embeddings(ROWS)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
        model = PeftModel.from_pretrained(base, str(exports / adapter)).eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def _reference_unmerged(ids: torch.Tensor) -> torch.Tensor:
    """The InternLM2 base with the checkpoint's trained tables and its LoRA unmerged (output's
    own LoRA included), all in float32."""
    sd = torch.load(FINETUNE, weights_only=True)
    weights = folder_weights(BASE)
    weights["model.tok_embeddings.weight"] = sd[P + "model.tok_embeddings.weight"]
    weights["output.weight"] = sd[P + "output.base_layer.weight"]
    lora = {}
    for k in sd:
        if k.endswith(".lora_A.default.weight"):
            name = k[len(P):].replace(".lora_A.default.weight", ".weight")
            lora[name] = (sd[k], sd[k.replace("lora_A", "lora_B")], SCALE)
    assert "output.weight" in lora
    cfg = json.loads((BASE / "config.json").read_text())
    return internlm2_forward(weights, cfg, ids, lora=lora)


def test_peft_adapter_equals_unmerged_lora_in_fp32(exports):
    from safetensors import safe_open

    with safe_open(str(exports / "adapter" / "adapter_model.safetensors"), "pt") as f:
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    assert dtypes["base_model.model.lm_head.weight"] == "F32"  # folded: kept in float32
    assert dtypes["base_model.model.model.embed_tokens.weight"] == "BF16"  # not folded: the checkpoint's dtype
    report = json.loads((exports / "adapter" / "omgtool-export.json").read_text())
    assert any("kept in float32" in n for n in report["notes"])

    ids = torch.randint(0, ROWS, (2, 23), generator=torch.Generator().manual_seed(7))
    want = _reference_unmerged(ids)
    got = _adapter_logits(exports, "adapter", ids)
    assert _rel(got, want) < 1e-5
    # --dtype bf16 rounds the folded head (and the LoRA factors): measurably worse, so the
    # 1e-5 bound above can fail
    rounded = _adapter_logits(exports, "adapter-bf16", ids)
    assert _rel(rounded, want) > 10 * _rel(got, want) and _rel(rounded, want) > 1e-5


# --- inference slips ---------------------------------------------------------------------

def test_non_lora_trainables_alone_is_a_finetune_stage():
    from omgtool.arch.infer import analyze
    from omgtool.formats import open_checkpoint
    from tests.paths import TINY

    path = TINY / "llava15" / "llava-v1.5-tiny-lora" / "non_lora_trainables.bin"
    analysis = analyze(open_checkpoint(path))
    assert analysis.family_name == "llava-1.5"
    assert analysis.stage == "finetune" and not analysis.lora_pairs
    reason = analysis.stage_reason
    assert "base_model.model." in reason and "PEFT" in reason
    report = json.loads(_ok("inspect", path, "--json").stdout)
    assert report["architecture"]["stage"] == "finetune" and report["stage_reason"] == reason
    assert f"stage finetune: {reason}" in report["notes"]
    # a stage-1 projector file (no wrapper) stays pretrain
    pre = analyze(open_checkpoint(TINY / "llava15" / "llava-v1.5-tiny-pretrain" / "mm_projector.bin"))
    assert pre.stage == "pretrain" and "no LoRA" in pre.stage_reason


def test_merge_plan_says_replaced_for_trained_tables(tmp_path):
    for ckpt in (FINETUNE, PRETRAIN):
        text = " ".join(_ok("merge-lora", ckpt, "--base", BASE, "--out", tmp_path / "o", "--dry-run").stdout.split())
        assert "replaced 2: model.tok_embeddings.weight (trained, 320 \u2192 324 rows), output.weight " \
               "(trained, 320 \u2192 324 rows" in text, text
        assert "resized" not in text
        plan = json.loads(_ok("merge-lora", ckpt, "--base", BASE, "--dry-run", "--json").stdout)
        assert {"model.tok_embeddings.weight", "output.weight"} <= set(plan["tensors"]["replaced"])
        assert plan["resized"]["output.weight"] == {"from": [320, 512], "to": [324, 512]}
