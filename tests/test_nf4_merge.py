"""merge-lora --base-weights original|nf4-dequant on the tiny fixture, through the CLI.

Oracle for the merged values: plain torch, W' = fp16(W_train.float() + (alpha/r) B.float() @ A.float())
with W_train from omgtool.kernels.nf4 (itself checked against the CUDA trees and bitsandbytes in
tests/test_nf4*.py); the standard merge's values must not change with the QLoRA measurements.
"""

from __future__ import annotations

import json

import pytest
import torch

from omgtool.kernels import nf4
from tests.cli_helpers import folder_weights, ok, one_line_error, run
from tests.paths import BASE, FINETUNE, PRETRAIN
from tests.verify_helpers import PEFT_PREFIX, load_base, load_ckpt

ALPHA = 256.0


@pytest.fixture(scope="module")
def merges(tmp_path_factory):
    root = tmp_path_factory.mktemp("nf4merge")
    out = {}
    for mode, extra in (("nf4-dequant", []), ("original", []), ("plain", ["--no-quant-stats"])):
        folder = root / mode
        ok("merge-lora", FINETUNE, "--base", BASE, "--out", folder, "--dtype", "fp16",
           "--base-weights", "original" if mode == "plain" else mode, *extra)
        out[mode] = folder
    return out


def lora_targets(ckpt):
    for key, a in ckpt.items():
        if ".lora_A." in key and key.startswith(PEFT_PREFIX + "model."):
            name = key[len(PEFT_PREFIX):].split(".lora_A.")[0] + ".weight"
            yield name, a, ckpt[key.replace(".lora_A.", ".lora_B.")]


def test_nf4_merge_adds_the_lora_to_the_round_trip(merges):
    base, ckpt = load_base(), load_ckpt(FINETUNE)
    got = folder_weights(merges["nf4-dequant"])
    standard = folder_weights(merges["plain"])
    settings = nf4.QuantSettings()  # the mapping's: nf4, 64, double quant, fp16 load and compute
    checked = 0
    for name, a, b in lora_targets(ckpt):
        w_train = nf4.dequantize_4bit(nf4.quantize_4bit(base[name].to(torch.float16), 64, "nf4", True))
        want = (w_train.float() + (ALPHA / a.shape[0]) * (b.float() @ a.float())).to(torch.float16)
        g = got[name]
        assert g.dtype == torch.float16
        close = torch.isclose(g.float(), want.float(), rtol=2 ** -10, atol=0)  # within one fp16 ulp
        assert bool(close.all()), name
        assert float((g == want).float().mean()) > 0.99, name
        assert not torch.equal(g, standard[name])  # the standard merge is a different model
        checked += 1
    assert checked == 10  # wqkv, wo, w1, w3, w2 in both layers
    # the head is not quantized in training: both modes merge its LoRA into the same weights
    assert torch.equal(got["output.weight"], standard["output.weight"])
    assert torch.equal(got["model.tok_embeddings.weight"], standard["model.tok_embeddings.weight"])


def test_standard_merge_is_unchanged_by_the_measurement(merges):
    a, b = folder_weights(merges["original"]), folder_weights(merges["plain"])
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    plain = json.loads((merges["plain"] / "omgtool-merge.json").read_text())
    assert "qlora" not in plain


def test_report_records_mode_settings_and_errors(merges):
    base, ckpt = load_base(), load_ckpt(FINETUNE)
    for mode in ("nf4-dequant", "original"):
        rep = json.loads((merges[mode] / "omgtool-merge.json").read_text())
        q = rep["qlora"]
        assert q["base_weights"] == mode
        assert {k: v["value"] for k, v in q["settings"].items()} == {
            "quant_type": "nf4", "blocksize": 64, "double_quant": True, "load_dtype": "fp16", "compute_dtype": "fp16"}
        assert all(v["source"].startswith("mapping (mappings/family_omg_llava.toml)") for v in q["settings"].values())
        assert "bitsandbytes' CUDA kernels" in q["implementation"]
        assert len(q["quantized"]) == 10 and q["skipped"] == ["output.weight"]
        assert mode in rep["numerics"]
        stats = q["per_tensor"]
        assert set(stats) == set(q["quantized"])
        name = "model.layers.1.feed_forward.w2.weight"
        w = base[name].float()
        q_norm = float((nf4.roundtrip(base[name], nf4.QuantSettings()).float() - w).norm())
        assert stats[name]["q_norm"] == pytest.approx(q_norm, rel=1e-4)
        assert stats[name]["q_over_w"] == pytest.approx(q_norm / float(w.norm()), rel=1e-4)
        a = ckpt[PEFT_PREFIX + "model.layers.1.feed_forward.w2.lora_A.default.weight"]
        b = ckpt[PEFT_PREFIX + "model.layers.1.feed_forward.w2.lora_B.default.weight"]
        delta = float(((ALPHA / a.shape[0]) * (b.double() @ a.double())).norm())
        assert stats[name]["q_over_delta"] == pytest.approx(q_norm / delta, rel=1e-4)
        assert 0.05 < q["summary"]["median_q_over_w"] < 0.15  # NF4 on gaussian weights: ~9 %


def test_dry_run_shows_settings_and_sources():
    res = ok("merge-lora", FINETUNE, "--base", BASE, "--base-weights", "nf4-dequant", "--dry-run")
    text = " ".join(res.stdout.split())
    assert "base weights: nf4-dequant" in text
    for setting in ("quant_type = nf4", "blocksize = 64", "double_quant = True", "load_dtype = fp16",
                    "compute_dtype = fp16"):
        assert f"qlora {setting} (mapping (mappings/family_omg_llava.toml)" in text
    assert "suggestion: --dtype fp16" in text
    assert "output.weight" in text  # kept in full precision, named

    res = ok("merge-lora", FINETUNE, "--base", BASE, "--base-weights", "nf4-dequant", "--dry-run", "--json",
             "--bnb-blocksize", "128", "--no-bnb-double-quant", "--bnb-compute-dtype", "bf16", "--dtype", "bf16")
    plan = json.loads(res.stdout)
    s = plan["qlora"]["settings"]
    assert s["blocksize"] == {"value": 128, "source": "user (--bnb-blocksize)"}
    assert s["double_quant"] == {"value": False, "source": "user (--bnb-double-quant)"}
    assert s["compute_dtype"]["value"] == "bf16"
    assert s["quant_type"]["source"].startswith("mapping")


def test_bad_qlora_arguments():
    one_line_error(run("merge-lora", FINETUNE, "--base", BASE, "--base-weights", "int8", "--dry-run"), 2,
                   "--base-weights")
    one_line_error(run("merge-lora", FINETUNE, "--base", BASE, "--base-weights", "nf4-dequant",
                       "--bnb-blocksize", "100", "--dry-run"), 2, "blocksize")
    one_line_error(run("merge-lora", FINETUNE, "--base", BASE, "--base-weights", "nf4-dequant",
                       "--bnb-quant-type", "int4", "--dry-run"), 2, "quant type")
    one_line_error(run("merge-lora", PRETRAIN, "--base", BASE, "--base-weights", "nf4-dequant", "--dry-run"), 2,
                   "stage")


def test_quantized_weight_without_lora_is_written_as_its_round_trip(tmp_path):
    """A LoRA on wqkv only: with nf4-dequant the other quantized linears change too (the model
    training computed with), and are reported as converted, not copied."""
    sd = {k: v for k, v in load_ckpt(FINETUNE).items() if ".lora_" not in k or ".attention.wqkv." in k}
    ckpt = tmp_path / "omg_llava_partial.pth"
    torch.save(sd, ckpt)
    res = ok("merge-lora", ckpt, "--base", BASE, "--out", tmp_path / "o", "--base-weights", "nf4-dequant",
             "--dtype", "fp16", "--json")
    report = json.loads(res.stdout)
    assert report["counts"]["merged"] == 2
    assert any("8 quantized weights without a LoRA are written as their 4-bit round trip" in n
               for n in report["notes"])
    converted = report["tensors"]["converted"]
    assert "model.layers.0.feed_forward.w2.weight" in converted and "model.norm.weight" in converted
    base, got = load_base(), folder_weights(tmp_path / "o")
    for name in ("model.layers.0.feed_forward.w2.weight", "model.layers.1.attention.wo.weight"):
        want = nf4.dequantize_4bit(nf4.quantize_4bit(base[name].to(torch.float16), 64, "nf4", True))
        assert torch.equal(got[name], want), name
    assert torch.equal(got["model.norm.weight"], base["model.norm.weight"].to(torch.float16))  # not quantized
    stats = report["qlora"]["per_tensor"]
    assert "q_over_delta" not in stats["model.layers.0.feed_forward.w2.weight"]  # no LoRA there
    assert "q_over_delta" in stats["model.layers.0.attention.wqkv.weight"]


def test_standard_merge_measures_quantized_weights_without_lora_and_copies_them(tmp_path):
    """--base-weights original with a LoRA on wqkv only: the other quantized linears are
    measured by the copy kernel's weight step, and still copied bit-exactly."""
    sd = {k: v for k, v in load_ckpt(FINETUNE).items() if ".lora_" not in k or ".attention.wqkv." in k}
    ckpt = tmp_path / "omg_llava_partial.pth"
    torch.save(sd, ckpt)
    report = json.loads(ok("merge-lora", ckpt, "--base", BASE, "--out", tmp_path / "o", "--json").stdout)
    assert report["counts"]["merged"] == 2 and report["counts"]["converted"] == 0
    q = report["qlora"]
    assert q["base_weights"] == "original" and set(q["per_tensor"]) == set(q["quantized"]) and len(q["quantized"]) == 10
    base, got = load_base(), folder_weights(tmp_path / "o")
    name = "model.layers.0.feed_forward.w2.weight"
    assert torch.equal(got[name], base[name])  # measured, not rounded
    q_norm = float((nf4.roundtrip(base[name], nf4.QuantSettings()).float() - base[name].float()).norm())
    assert q["per_tensor"][name]["q_norm"] == pytest.approx(q_norm, rel=1e-4)
    assert "q_over_delta" not in q["per_tensor"][name]
