"""Small seed inputs for the fuzzer, built in code: every container omgtool reads.

Each seed is a file or a folder under `root`; they stay small (a few KB) so one case
takes milliseconds, and use real key names so family inference and LoRA code run.
"""

from __future__ import annotations

import collections
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from tests.paths import BASE, TINY

ADAPTER = TINY / "peft_adapter" / "colllavai-tiny-lora"
ADAPTER_BASE = TINY / "peft_adapter" / "colllavai-tiny-base"
# Small side files of the base folder are the ones mutated there (its shards are large).
BASE_SIDE_FILES = ("config.json", "model.safetensors.index.json", "tokenizer_config.json",
                   "special_tokens_map.json", "generation_config.json")


def _omg_like() -> "collections.OrderedDict[str, torch.Tensor]":
    sd = collections.OrderedDict()
    sd["llm.model.tok_embeddings.weight"] = torch.randn(8, 4)
    sd["llm.output.weight"] = torch.randn(8, 4)
    for i in range(2):
        p = f"llm.base_model.model.model.layers.{i}.attention.wqkv"
        sd[f"{p}.lora_A.default.weight"] = torch.randn(2, 4)
        sd[f"{p}.lora_B.default.weight"] = torch.randn(12, 2)
    sd["projector.model.query_proj.weight"] = torch.randn(6, 4).half()
    sd["projector.model.query_proj.bias"] = torch.arange(6, dtype=torch.bfloat16)
    return sd


def _fresh_copy(src: Path, dst: Path) -> Path:
    """A copy of folder `src` at `dst`, replacing whatever a previous run left there."""
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    return dst


def build(root: Path) -> list[Path]:
    root.mkdir(parents=True, exist_ok=True)
    sd = _omg_like()
    seeds = []
    zip_path = root / "omg_like.pth"
    torch.save(sd, zip_path)
    seeds.append(zip_path)
    legacy = root / "legacy.pth"
    big = torch.arange(24, dtype=torch.float32)
    torch.save({"state_dict": {"a.weight": big[4:10], "b.weight": big.view(4, 6)[:, 1:3], "step": 3}},
               legacy, _use_new_zipfile_serialization=False)
    seeds.append(legacy)
    nested = root / "nested.pt"
    torch.save({"model": {"state_dict": dict(list(sd.items())[:3])},
                "optimizer": {"state": {0: {"exp_avg": torch.zeros(3)}}, "param_groups": [{"lr": 0.1}]},
                "epoch": 7, "names": ["x", ("y", 2)]}, nested)
    seeds.append(nested)
    bare = root / "bare.pt"
    torch.save(torch.ones(2, 3), bare)
    seeds.append(bare)
    st = root / "small.safetensors"
    save_file({"model.norm.weight": torch.ones(4), "output.weight": torch.zeros(8, 4)}, st,
              metadata={"format": "pt"})
    seeds.append(st)
    sharded = root / "sharded"
    sharded.mkdir(exist_ok=True)
    save_file({"model.norm.weight": torch.ones(4)}, sharded / "model-00001-of-00002.safetensors")
    save_file({"output.weight": torch.zeros(8, 4)}, sharded / "model-00002-of-00002.safetensors")
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": {
        "model.norm.weight": "model-00001-of-00002.safetensors",
        "output.weight": "model-00002-of-00002.safetensors"}}))
    (sharded / "config.json").write_text(json.dumps({"num_hidden_layers": 1, "hidden_size": 4,
                                                     "vocab_size": 8, "rms_norm_eps": 1e-5}))
    seeds.append(sharded)
    seeds.append(_fresh_copy(ADAPTER, root / "adapter"))
    manifest = root / "shapes.json"
    manifest.write_text(json.dumps({"format_version": 1, "source": "omg_like.pth", "tensors": [
        {"name": k, "shape": list(v.shape), "dtype": None if i % 3 == 0 else "F32"}
        for i, (k, v) in enumerate(sd.items())]}))
    seeds.append(manifest)
    seeds.append(_fresh_copy(BASE, root / "internlm2-base"))
    return seeds
