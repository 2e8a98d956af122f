"""Test helpers for `omgtool verify`: merged / exported folders built with plain torch.

Written from the facts in shared/reference/omg-llava.md, independently of omgtool's merge
and conversion code, so that verify is judged on inputs it did not produce itself:
  - merge: W' = cast(W.float() + (alpha / r) * B.float() @ A.float()) for every LoRA pair,
    the checkpoint's tok_embeddings / output.base_layer replace the base's;
  - Llama export: wqkv rows viewed as [kv, g + 2, head_dim] ("grouped"), or — to make a
    deliberately wrong export — cut as [q rows | k rows | v rows] ("contiguous").
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tests.paths import BASE as TINY_BASE, FINETUNE as TINY_FINETUNE, PRETRAIN as TINY_PRETRAIN  # noqa: F401 (re-exported)
ADDED = ["[SEG]", "<p>", "</p>", "<region>", "<mark>"]
PEFT_PREFIX = "llm.base_model.model."


def load_base(folder: Path = TINY_BASE) -> dict[str, torch.Tensor]:
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    out: dict[str, torch.Tensor] = {}
    for shard in sorted(set(index["weight_map"].values())):
        out.update(load_file(str(folder / shard)))
    return out


def load_ckpt(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)


def merged_internlm2(base: dict, ckpt: dict, alpha: float) -> dict[str, torch.Tensor]:
    """Plain-torch merge of an OMG-LLaVA finetune (or pretrain) state dict into InternLM2 weights."""
    out = dict(base)
    for key, t in ckpt.items():
        if not key.startswith("llm."):
            continue
        name = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key[len("llm."):]
        if ".lora_" in name:
            continue
        name = name.replace(".base_layer.", ".")
        out[name] = t
    for key, a in ckpt.items():
        if ".lora_A." not in key:
            continue
        b = ckpt[key.replace(".lora_A.", ".lora_B.")]
        target = key[len(PEFT_PREFIX):].split(".lora_A.")[0] + ".weight"
        w = out[target]
        scale = alpha / a.shape[0]
        out[target] = (w.float() + scale * (b.float() @ a.float())).to(w.dtype)
    return out


def qkv_rows(heads: int, kv: int, head_dim: int, grouping: str):
    g = heads // kv
    n = (heads + 2 * kv) * head_dim
    if grouping == "contiguous":  # the classic mistake: first heads*d rows are q
        q = list(range(0, heads * head_dim))
        k = list(range(heads * head_dim, (heads + kv) * head_dim))
        v = list(range((heads + kv) * head_dim, n))
        return q, k, v
    q, k, v = [], [], []
    for group in range(kv):
        base = group * (g + 2) * head_dim
        for s in range(g):
            q += range(base + s * head_dim, base + (s + 1) * head_dim)
        k += range(base + g * head_dim, base + (g + 1) * head_dim)
        v += range(base + (g + 1) * head_dim, base + (g + 2) * head_dim)
    return q, k, v


def to_llama(weights: dict, config: dict, grouping: str = "grouped") -> dict[str, torch.Tensor]:
    heads, kv = config["num_attention_heads"], config["num_key_value_heads"]
    hd = config["hidden_size"] // heads
    q, k, v = (torch.tensor(r) for r in qkv_rows(heads, kv, hd, grouping))
    out = {"model.embed_tokens.weight": weights["model.tok_embeddings.weight"],
           "model.norm.weight": weights["model.norm.weight"], "lm_head.weight": weights["output.weight"]}
    for i in range(config["num_hidden_layers"]):
        p, t = f"model.layers.{i}.", f"model.layers.{i}."
        wqkv = weights[p + "attention.wqkv.weight"]
        out[t + "self_attn.q_proj.weight"] = wqkv[q].clone()
        out[t + "self_attn.k_proj.weight"] = wqkv[k].clone()
        out[t + "self_attn.v_proj.weight"] = wqkv[v].clone()
        out[t + "self_attn.o_proj.weight"] = weights[p + "attention.wo.weight"]
        out[t + "mlp.gate_proj.weight"] = weights[p + "feed_forward.w1.weight"]
        out[t + "mlp.up_proj.weight"] = weights[p + "feed_forward.w3.weight"]
        out[t + "mlp.down_proj.weight"] = weights[p + "feed_forward.w2.weight"]
        out[t + "input_layernorm.weight"] = weights[p + "attention_norm.weight"]
        out[t + "post_attention_layernorm.weight"] = weights[p + "ffn_norm.weight"]
    return out


def llama_config(config: dict, vocab: int) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": config["hidden_size"],
            "intermediate_size": config["intermediate_size"], "num_hidden_layers": config["num_hidden_layers"],
            "num_attention_heads": config["num_attention_heads"],
            "num_key_value_heads": config["num_key_value_heads"], "head_dim": config["hidden_size"]
            // config["num_attention_heads"], "rms_norm_eps": config["rms_norm_eps"],
            "rope_theta": config["rope_theta"], "max_position_embeddings": config["max_position_embeddings"],
            "vocab_size": vocab, "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False,
            "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2,
            "torch_dtype": "bfloat16"}


def write_tokenizer(src: Path, out: Path, vocab_base: int, added: bool = True) -> None:
    for name in ("tokenizer.model", "special_tokens_map.json", "generation_config.json"):
        if (src / name).is_file():
            shutil.copy(src / name, out / name)
    cfg = json.loads((src / "tokenizer_config.json").read_text())
    if added:
        for i, tok in enumerate(ADDED):
            cfg["added_tokens_decoder"][str(vocab_base + i)] = {
                "content": tok, "lstrip": False, "normalized": False, "rstrip": False,
                "single_word": False, "special": True}
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))


def build_merged(out: Path, *, alpha: float = 256.0, ckpt_path: Path = TINY_FINETUNE, base: Path = TINY_BASE,
                 layout: str = "internlm2", grouping: str = "grouped", record_base: bool = True,
                 projector: bool = True, added_tokens: bool = True) -> Path:
    """A merged model folder (InternLM2 layout as merge-lora writes it, or a Llama export)."""
    out.mkdir(parents=True)
    config = json.loads((base / "config.json").read_text())
    ckpt = load_ckpt(ckpt_path)
    weights = merged_internlm2(load_base(base), ckpt, alpha)
    vocab = weights["model.tok_embeddings.weight"].shape[0]
    if layout == "llama":
        save_file(to_llama(weights, config, grouping), str(out / "model.safetensors"))
        (out / "config.json").write_text(json.dumps(llama_config(config, vocab), indent=2))
    else:
        save_file(weights, str(out / "model.safetensors"))
        (out / "config.json").write_text(json.dumps({**config, "vocab_size": vocab}, indent=2))
    write_tokenizer(base, out, config["vocab_size"], added=added_tokens)
    if projector:
        extra = {k: v.contiguous() for k, v in ckpt.items() if k.startswith("projector")}
        save_file(extra, str(out / "projector.safetensors"))
    if record_base:
        (out / "omgtool-merge.json").write_text(json.dumps({"base": {"path": str(base)}, "alpha": alpha}))
    return out


# --- shared by tests/test_verify*.py (pytest picks up fixtures imported into a test module) -----------

import pytest  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

runner = CliRunner()
FT = str(TINY_FINETUNE)


def verify(*args, json_out: bool = True):
    """Run `omgtool verify ARGS [--json]` in process: (result, parsed report or None)."""
    from omgtool.cli import app

    argv = ["verify", *map(str, args)] + (["--json"] if json_out else [])
    result = runner.invoke(app, argv)
    report = json.loads(result.stdout) if json_out and result.stdout.strip() else None
    return result, report


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("verify")
    return {
        "merged": build_merged(root / "merged"),
        "wrong_alpha": build_merged(root / "wrong_alpha", alpha=128.0),
        "contiguous": build_merged(root / "contiguous", layout="llama", grouping="contiguous"),
        "root": root,
    }


@pytest.fixture(scope="module")
def good_run(folders):
    result, report = verify(folders["merged"], "--adapter", FT)
    assert result.exit_code == 0, result.output
    return report
