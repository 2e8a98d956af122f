"""verify --reference nf4, and both merge modes against the real QLoRA training stack.

The training stack (transformers BitsAndBytesConfig 4-bit + PEFT LoRA in train() mode, dropout 0,
the way xtuner trained OMG-LLaVA) needs bitsandbytes (test extra qlora-oracle): that test skips
without it. Its model is built with plain torch from the fixture files (tests/verify_helpers
to_llama), not with omgtool's export.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from tests.cli_helpers import ok
from tests.paths import BASE, FINETUNE
from tests.verify_helpers import PEFT_PREFIX, llama_config, load_base, load_ckpt, qkv_rows, to_llama, verify

FT = str(FINETUNE)


@pytest.fixture(scope="module")
def merged(tmp_path_factory):
    root = tmp_path_factory.mktemp("nf4verify")
    out = {}
    for mode in ("nf4-dequant", "original"):
        ok("merge-lora", FINETUNE, "--base", BASE, "--out", root / mode, "--dtype", "fp16", "--base-weights", mode)
        out[mode] = root / mode
    out["root"] = root
    return out


def test_nf4_merge_matches_the_training_forward(merged):
    result, rep = verify(merged["nf4-dequant"], "--adapter", FT, "--reference", "nf4")
    assert result.exit_code == 0, result.output
    m = rep["checks"]["merge"]
    assert m["status"] == "pass" and m["reference_base"].startswith("NF4 round trip")
    assert m["delta"]["rel_l2"] <= m["tolerance_rel_l2"]
    assert m["vs_peft_merge"]["rel_l2"] < 1e-6  # PEFT merging into the same round trip gives the same model
    assert rep["qlora_reference"]["merge_base_weights"] == "nf4-dequant"
    assert "training_forward" not in rep["checks"]


def test_standard_merge_gets_its_distance_from_the_training_forward(merged):
    result, rep = verify(merged["original"], "--adapter", FT, "--reference", "nf4")
    assert result.exit_code == 0, result.output
    assert rep["checks"]["merge"]["status"] == "pass"  # its own check, as without --reference nf4
    assert rep["checks"]["merge"]["reference_base"] == "original"
    info = rep["checks"]["training_forward"]
    assert info["status"] == "info"
    assert info["delta"]["rel_l2"] > 10 * rep["checks"]["merge"]["tolerance_rel_l2"]
    assert info["lora_effect"]["rel_l2"] > 0
    assert "deviates from the training forward by rel L2" in info["line"]
    result, _ = verify(merged["original"], "--adapter", FT, "--reference", "nf4", json_out=False)
    assert "training_forward" in result.stdout and "info" in result.stdout


def test_a_standard_merge_claiming_nf4_fails(merged):
    fake = merged["root"] / "claims-nf4"
    shutil.copytree(merged["original"], fake)
    record = json.loads((fake / "omgtool-merge.json").read_text())
    record["qlora"]["base_weights"] = "nf4-dequant"
    (fake / "omgtool-merge.json").write_text(json.dumps(record))
    result, rep = verify(fake, "--adapter", FT, "--reference", "nf4")
    assert result.exit_code == 1
    assert rep["checks"]["merge"]["status"] == "fail"


def test_bad_reference():
    result, _ = verify(BASE, "--reference", "int8", json_out=False)
    assert result.exit_code == 2 and "--reference" in result.stderr


# --- the real training stack ------------------------------------------------------------------

def _training_forward(tmp_path, ids):
    """Logits of the QLoRA training forward: Llama base loaded 4-bit NF4 through transformers'
    BitsAndBytesConfig (double quant, fp16 load and compute), the checkpoint's LoRA through PEFT
    on every linear and the head, train() mode, dropout 0."""
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (test extra qlora-oracle)")
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    base, ckpt = load_base(), load_ckpt(FINETUNE)
    config = json.loads((BASE / "config.json").read_text())
    # trained in full (not 4-bit): the resized embeddings and head replace the base's
    base["model.tok_embeddings.weight"] = ckpt[PEFT_PREFIX + "model.tok_embeddings.weight"]
    base["output.weight"] = ckpt[PEFT_PREFIX + "output.base_layer.weight"]
    vocab = base["output.weight"].shape[0]
    folder = tmp_path / "base-llama"
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in to_llama(base, config).items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(llama_config(config, vocab)))
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.float16)
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float16, quantization_config=bnb,
                                                     device_map="cpu")
    except Exception as exc:  # an install whose CPU 4-bit path cannot run here
        pytest.skip(f"transformers + bitsandbytes cannot load a 4-bit model on this CPU: {exc}")
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    assert type(model.lm_head).__name__ == "Linear"  # transformers keeps the head in full precision
    heads, kv = config["num_attention_heads"], config["num_key_value_heads"]
    q_rows, k_rows, v_rows = qkv_rows(heads, kv, config["hidden_size"] // heads, "grouped")
    names = {"attention.wo": ["self_attn.o_proj"], "feed_forward.w1": ["mlp.gate_proj"],
             "feed_forward.w3": ["mlp.up_proj"], "feed_forward.w2": ["mlp.down_proj"],
             "attention.wqkv": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]}
    factors = {}
    for key, a in ckpt.items():
        if ".lora_A." not in key:
            continue
        b = ckpt[key.replace(".lora_A.", ".lora_B.")]
        module = key[len(PEFT_PREFIX):].split(".lora_A.")[0]
        if module == "output":
            factors["lm_head"] = (a, b)
            continue
        layer, rest = module.removeprefix("model.layers.").split(".", 1)
        targets = names[rest]
        parts = [b[q_rows], b[k_rows], b[v_rows]] if rest == "attention.wqkv" else [b]
        for t, part in zip(targets, parts):
            factors[f"model.layers.{layer}.{t}"] = (a, part)
    rank = next(iter(factors.values()))[0].shape[0]
    cfg = LoraConfig(r=rank, lora_alpha=256, lora_dropout=0.0, bias="none",
                     target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                                     "lm_head"])
    model = get_peft_model(model, cfg)
    with torch.no_grad():
        for name, (a, b) in factors.items():
            mod = model.base_model.model.get_submodule(name)
            mod.lora_A["default"].weight.copy_(a)
            mod.lora_B["default"].weight.copy_(b)
    model.train()  # bitsandbytes' CPU Linear4bit repacks its weight in eval()
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def _merged_forward(folder, ids):
    from safetensors.torch import load_file
    from transformers import LlamaConfig, LlamaForCausalLM

    config = json.loads((BASE / "config.json").read_text())
    weights = {}
    for f in sorted(folder.glob("model*.safetensors")):
        weights.update(load_file(str(f)))
    vocab = weights["output.weight"].shape[0]
    model = LlamaForCausalLM(LlamaConfig(**llama_config(config, vocab))).float()
    model.load_state_dict({k: v.float() for k, v in to_llama(weights, config).items()}, strict=False)
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def _rel(a, b):
    return float((a - b).norm() / b.norm()), float((a.argmax(-1) == b.argmax(-1)).float().mean())


def test_against_the_qlora_training_stack(merged, tmp_path):
    ids = (torch.arange(1, 80) * 7 % 320).unsqueeze(0)
    train = _training_forward(tmp_path, ids)
    nf4_rel, nf4_top1 = _rel(_merged_forward(merged["nf4-dequant"], ids), train)
    std_rel, std_top1 = _rel(_merged_forward(merged["original"], ids), train)
    # the nf4-dequant merge is the training forward up to fp16 rounding (and bitsandbytes' CPU
    # double-quant codes / q,k,v quantized apart); the standard merge is a different model
    assert nf4_rel < 0.01 and nf4_top1 >= 0.97, (nf4_rel, nf4_top1)
    assert std_rel > 10 * nf4_rel, (std_rel, nf4_rel)
    assert std_top1 < nf4_top1
