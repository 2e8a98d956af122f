"""`omgtool diff` between checkpoints: mapping-driven pairing, value deltas against a plain
torch float64 oracle (and numpy's own isclose for tolerances), row-count-changed
embeddings, tampered copies, unreadable and unsafe inputs, streaming memory."""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from fixtures import generate as gen
from omgtool.cli import app
from omgtool.ops.diff import Tolerance, compare_values, pair_keys
from omgtool.errors import InvalidArgument
from omgtool.formats import open_checkpoint
from tests.ckpt_builders import data_pkl, tensor_entry, write_torch_zip

from tests.paths import BASE, FINETUNE, PRETRAIN, ROOT, SPEC
runner = CliRunner()


def diff(*args, code: int | None = None) -> dict:
    result = runner.invoke(app, ["diff", *map(str, args), "--json"])
    if code is not None:
        assert result.exit_code == code, (result.exit_code, result.output)
    report = json.loads(result.stdout)
    report["_exit"] = result.exit_code
    return report


def load(path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)


def oracle(a: torch.Tensor, b: torch.Tensor) -> dict:
    """Deltas computed independently: whole tensors in float64 with torch."""
    a, b = a.double().reshape(-1), b.double().reshape(-1)
    d = a - b
    return {"max_abs": d.abs().max().item(), "rel_l2": (d.norm() / a.norm()).item(),
            "cosine": (a @ b / (a.norm() * b.norm())).item(), "differing": int((a != b).sum())}


def assert_delta(entry: dict, a: torch.Tensor, b: torch.Tensor) -> None:
    want = oracle(a, b)
    assert entry["max_abs"] == pytest.approx(want["max_abs"], rel=1e-6)
    assert entry["rel_l2"] == pytest.approx(want["rel_l2"], rel=1e-5)
    assert entry["cosine"] == pytest.approx(want["cosine"], rel=1e-6)
    assert entry["differing"] == want["differing"]
    assert entry["numel"] == a.numel()


# --- pretrain vs finetune: normalized pairing ------------------------------------------------

def test_pretrain_vs_finetune():
    r = diff(PRETRAIN, FINETUNE, code=1)
    pre, ft = load(PRETRAIN), load(FINETUNE)
    renamed = {(p["a"], p["b"]) for p in r["renamed"]}
    assert renamed == {("llm.model.tok_embeddings.weight", "llm.base_model.model.model.tok_embeddings.weight"),
                       ("llm.output.weight", "llm.base_model.model.output.base_layer.weight")}
    assert r["summary"]["paired"] == 17
    # LoRA factors exist only in the finetune file: 10 per layer + the output pair
    lora_keys = [k for k in ft if ".lora_" in k]
    assert len(lora_keys) == 10 * SPEC["num_layers"] + 2
    assert [e["name"] for e in r["only_in_b"]] == lora_keys
    assert all(e["group"] == "llm.lora" for e in r["only_in_b"])
    assert r["only_in_a"] == [] and r["unexplained_only_in_b"] == []
    # every paired tensor was retrained: all 17 values changed, deltas as torch computes them
    changed = {(e["a"], e["b"]): e for e in r["value_changed"]}
    assert len(changed) == 17 and r["identical"] == 0
    projector = [k for k in pre if k.startswith("projector")]
    assert len(projector) == 15
    for k in projector:
        assert_delta(changed[(k, k)], pre[k], ft[k])
    for a, b in renamed:
        assert_delta(changed[(a, b)], pre[a], ft[b])
    assert r["differences"] == 22 + 17


def test_no_normalize_pairs_exact_names_only():
    r = diff(PRETRAIN, FINETUNE, "--no-normalize", code=1)
    only_a = [e["name"] for e in r["only_in_a"]]
    assert only_a == ["llm.model.tok_embeddings.weight", "llm.output.weight"]
    assert r["summary"]["paired"] == 15 and r["renamed"] == []


def test_identical():
    r = diff(FINETUNE, FINETUNE, code=0)
    assert r["identical"] == 39 and r["differences"] == 0 and r["value_changed"] == []
    result = runner.invoke(app, ["diff", str(FINETUNE), str(FINETUNE)])
    assert result.exit_code == 0 and "no differences" in result.stdout


def test_same_values_across_containers(tmp_path):
    """The same values in a safetensors file and a legacy pickle are identical."""
    sd = load(FINETUNE)
    st = gen.write_checkpoint(sd, tmp_path / "ft.safetensors", "safetensors")
    legacy = gen.write_checkpoint(sd, tmp_path / "ft_legacy.pth", "legacy")
    r = diff(st, legacy, code=0)
    assert r["identical"] == 39 and r["a"]["format"] == "safetensors" and r["b"]["format"] == "torch-legacy"


# --- tampered copies --------------------------------------------------------------------------

def test_tampered_copy(tmp_path):
    sd = load(FINETUNE)
    tampered = collections.OrderedDict(sd)
    reshaped = "llm.base_model.model.model.layers.0.attention.wo.lora_A.default.weight"  # [8, 512]
    dropped = "projector.model.model_feat.0.bias"
    changed = "projector_text2vision.model.2.weight"
    tampered[reshaped] = sd[reshaped].reshape(16, 256).clone()
    del tampered[dropped]
    tampered[changed] = sd[changed].clone()
    tampered[changed][3, 5] += 0.25
    path = gen.write_checkpoint(tampered, tmp_path / "tampered.pth")

    r = diff(FINETUNE, path, code=1)
    assert [e["name"] for e in r["only_in_a"]] == [dropped]
    assert r["only_in_b"] == []
    assert r["shape_changed"] == [{"a": reshaped, "b": reshaped, "shape_a": [8, 512], "shape_b": [16, 256],
                                   "dtype_a": "F32", "dtype_b": "F32"}]
    assert [(e["a"], e["b"]) for e in r["value_changed"]] == [(changed, changed)]
    entry = r["value_changed"][0]
    assert entry["differing"] == 1 and entry["mismatched"] == 1
    assert_delta(entry, sd[changed], tampered[changed])
    assert entry["max_abs"] == pytest.approx(0.25, rel=1e-6)
    assert r["identical"] == 39 - 3 and r["differences"] == 3

    # and the human output names all three, with the exit code
    result = runner.invoke(app, ["diff", str(FINETUNE), str(path)], env={"COLUMNS": "300"})
    assert result.exit_code == 1
    for text in ("only in A (1)", "shape changed (1)", "values changed (1)", "3 differences",
                 dropped, reshaped, changed):
        assert text in result.stdout


def test_dtype_change_is_reported_and_values_compared(tmp_path):
    sd = load(FINETUNE)
    name = "projector.model.model.2.weight"
    copy = collections.OrderedDict(sd)
    copy[name] = sd[name].to(torch.bfloat16)
    path = gen.write_checkpoint(copy, tmp_path / "bf.pth")
    r = diff(FINETUNE, path, code=1)
    assert r["dtype_changed"] == [{"a": name, "b": name, "dtype_a": "F32", "dtype_b": "BF16"}]
    (entry,) = r["value_changed"]
    assert_delta(entry, sd[name], copy[name])


# --- tolerance --------------------------------------------------------------------------------

def _perturbed(tmp_path, scale: float):
    sd = load(FINETUNE)
    name = "projector.model.model.0.weight"
    copy = collections.OrderedDict(sd)
    g = torch.Generator().manual_seed(0)
    copy[name] = sd[name] + scale * torch.randn(sd[name].shape, generator=g)
    return sd[name], copy[name], gen.write_checkpoint(copy, tmp_path / "p.pth")


def test_tolerance_absolute(tmp_path):
    a, b, path = _perturbed(tmp_path, 1e-4)
    worst = (a.double() - b.double()).abs().max().item()
    r = diff(FINETUNE, path, "--atol", worst * 1.01, code=0)
    assert r["value_changed"] == [] and len(r["within_tolerance"]) == 1
    assert r["within_tolerance"][0]["mismatched"] == 0 and r["identical"] == 38
    r = diff(FINETUNE, path, "--atol", worst * 0.5, code=1)
    (entry,) = r["value_changed"]
    want = int((~np.isclose(a.numpy(), b.numpy(), rtol=0, atol=worst * 0.5)).sum())
    assert entry["mismatched"] == want > 0
    r = diff(FINETUNE, path, code=1)  # default: exact
    assert r["value_changed"][0]["mismatched"] == r["value_changed"][0]["differing"] == a.numel()


@pytest.mark.parametrize("rtol,atol", [(1e-3, 0.0), (1e-2, 1e-6), (0.0, 3e-5)])
def test_tolerance_matches_numpy_isclose(tmp_path, rtol, atol):
    a, b, path = _perturbed(tmp_path, 1e-4)
    r = diff(FINETUNE, path, "--rtol", rtol, "--atol", atol)
    want = int((~np.isclose(a.numpy(), b.numpy(), rtol=rtol, atol=atol)).sum())  # |a-b| <= atol + rtol*|b|
    entries = r["value_changed"] + r["within_tolerance"]
    assert len(entries) == 1 and entries[0]["mismatched"] == want
    assert r["_exit"] == (1 if want else 0)


def test_bad_tolerance_is_exit_2():
    result = runner.invoke(app, ["diff", str(PRETRAIN), str(PRETRAIN), "--atol", "-1"])
    assert result.exit_code == 2 and result.stderr.startswith("error: ") and "--atol" in result.stderr
    with pytest.raises(InvalidArgument):
        Tolerance(rtol=float("nan"))


def test_nan_and_inf(tmp_path):
    x = torch.arange(12, dtype=torch.float32)
    y = x.clone()
    x[2] = y[2] = float("nan")  # NaN at the same place: equal
    x[4] = y[4] = float("inf")  # equal infinities: equal
    torch.save({"w": x, "v": x.clone()}, tmp_path / "a.pth")
    v = y.clone()
    v[7] = float("nan")  # NaN against a number: a difference, max |a-b| is NaN
    torch.save({"w": y, "v": v}, tmp_path / "b.pth")
    r = diff(tmp_path / "a.pth", tmp_path / "b.pth", code=1)
    assert r["identical"] == 1
    (entry,) = r["value_changed"]
    assert entry["a"] == "v" and entry["differing"] == 1 and entry["max_abs"] == "nan"
    assert entry["nonfinite"] == 3


def test_complex_values_and_complex_against_real(tmp_path):
    g = torch.Generator().manual_seed(2)
    c = torch.randn(5, 3, dtype=torch.complex64, generator=g)
    c2 = c.clone()
    c2[1, 2] += 0.5j
    torch.save({"c": c, "k": c}, tmp_path / "a.pth")
    torch.save({"c": c2, "k": torch.randn(5, 3, generator=g)}, tmp_path / "b.pth")
    r = diff(tmp_path / "a.pth", tmp_path / "b.pth", code=1)
    (entry,) = r["value_changed"]
    assert_delta(entry, torch.view_as_real(c), torch.view_as_real(c2))  # (re, im) pairs
    assert r["dtype_changed"] == [{"a": "k", "b": "k", "dtype_a": "C64", "dtype_b": "F32"}]
    assert any("complex against real" in n for n in r["notes"])


# --- rows added / removed ---------------------------------------------------------------------

def test_base_folder_vs_pretrain_rows_added():
    r = diff(BASE, PRETRAIN, code=1)
    assert r["a"]["family"] == "internlm2" and r["b"]["family"] == "omg-llava"
    v, v4 = SPEC["vocab_size"], SPEC["ckpt_vocab_size"]
    rows = {(e["a"], e["b"]): e for e in r["rows_added"]}
    assert set(rows) == {("model.tok_embeddings.weight", "llm.model.tok_embeddings.weight"),
                         ("output.weight", "llm.output.weight")}
    for e in rows.values():
        assert (e["rows_a"], e["rows_b"], e["count"], e["first"], e["last"]) == (v, v4, 4, v, v4 - 1)
        assert e["shared_rows"] == v and e["shared_rows_identical"] is False
    assert r["shape_changed"] == [] and r["rows_removed"] == []
    # shared rows compared against torch: base rows [:V] vs the trained copies' rows [:V]
    from safetensors.torch import load_file

    base = {}
    for f in sorted(BASE.glob("*.safetensors")):
        base.update(load_file(f))
    pre = load(PRETRAIN)
    changed = {(e["a"], e["b"]): e for e in r["value_changed"]}
    for a, b in rows:
        assert changed[(a, b)]["shared_rows"] == v
        assert_delta(changed[(a, b)], base[a], pre[b][:v])
    # the layers of the base are only in A (the pretrain file holds none)
    assert len(r["only_in_a"]) == SPEC["base"]["num_tensors"] - 2
    assert all(e["group"].startswith("llm.") for e in r["only_in_a"])


def test_rows_removed_and_identical_shared_rows(tmp_path):
    sd = load(PRETRAIN)
    v = SPEC["vocab_size"]
    cut = collections.OrderedDict(sd)
    cut["llm.output.weight"] = sd["llm.output.weight"][:v].clone()
    path = gen.write_checkpoint(cut, tmp_path / "cut.pth")
    r = diff(PRETRAIN, path, code=1)
    (e,) = r["rows_removed"]
    assert (e["a"], e["count"], e["first"], e["last"], e["shared_rows_identical"]) == \
        ("llm.output.weight", 4, v, v + 3, True)
    assert r["identical"] == 17 and r["value_changed"] == [] and r["differences"] == 1


def test_lora_b_of_output_rows_added(tmp_path):
    """output's LoRA B has vocab rows too (the mapping's dims say so): rows, not shape."""
    sd = load(FINETUNE)
    key = "llm.base_model.model.output.lora_B.default.weight"
    small = collections.OrderedDict(sd)
    small[key] = sd[key][:300].clone()
    path = gen.write_checkpoint(small, tmp_path / "small.pth")
    r = diff(path, FINETUNE, code=1)
    (e,) = r["rows_added"]
    assert (e["a"], e["count"], e["first"], e["last"]) == (key, 24, 300, 323)
    assert r["shape_changed"] == []


# --- library: pairing, streaming ---------------------------------------------------------------

def test_pairing_ambiguous_canonical_falls_back_to_exact_names():
    from omgtool.arch.infer import detect_family
    from omgtool.arch.mapping import load_registry

    keys = ["llm.model.tok_embeddings.weight", "llm.base_model.model.model.tok_embeddings.weight",
            "projector.model.query_proj.weight"]
    family, matches, _ = detect_family(keys, None, load_registry())
    assert family.name == "omg-llava"
    p = pair_keys(keys, matches, ["llm.model.tok_embeddings.weight"],
                  {k: m for k, m in matches.items() if k == "llm.model.tok_embeddings.weight"})
    assert [(x.a, x.b, x.canonical) for x in p.pairs] == [
        ("llm.model.tok_embeddings.weight", "llm.model.tok_embeddings.weight", None)]
    assert p.only_a == keys[1:] and p.only_b == []
    assert any("share the normalized name" in n for n in p.notes)


def test_blocks_and_chunks_across_boundaries(tmp_path, monkeypatch):
    """Small blocks/chunks, mixed dtypes (bf16 vs fp32), a strided view: same deltas as torch."""
    import omgtool.ops.diff as compare

    monkeypatch.setattr(compare, "BLOCK_ELEMENTS", 1000)
    monkeypatch.setattr(compare, "CHUNK_ELEMENTS", 333)
    g = torch.Generator().manual_seed(1)
    a = torch.randn(97, 61, generator=g)
    b = a + 0.01 * torch.randn(97, 61, generator=g)
    torch.save({"w": a, "t": a.t(), "h": a.half()}, tmp_path / "a.pth")
    torch.save({"w": b.bfloat16(), "t": b.t().contiguous(), "h": b.half()}, tmp_path / "b.pth")
    ca, cb = open_checkpoint(tmp_path / "a.pth"), open_checkpoint(tmp_path / "b.pth")
    assert ca.tensors["t"].stride == (1, 61)  # really a strided view on disk
    for name, other in (("w", b.bfloat16()), ("t", b.t()), ("h", b.half())):
        mine = a.t() if name == "t" else (a.half() if name == "h" else a)
        delta = compare_values(ca, ca.tensors[name], cb, cb.tensors[name])
        assert_delta(delta.as_dict(), mine, other)
    same = compare_values(ca, ca.tensors["t"], ca, ca.tensors["t"])
    assert same.identical and same.numel == a.numel()


def test_peak_rss_is_bounded_by_blocks_not_tensors(tmp_path):
    """Two files with one 256 MB tensor each: the diff's peak RSS stays far below one tensor."""
    n = 64 * 2**20
    a = torch.ones(n)
    torch.save({"big": a}, tmp_path / "a.pth")
    a[n // 2] = 2.0
    torch.save({"big": a}, tmp_path / "b.pth")
    del a
    # VmHWM: this process's own peak (ru_maxrss would carry pytest's peak across fork + exec)
    code = ("import sys; from omgtool.ops.diff import diff_paths; "
            "r = diff_paths(sys.argv[1], sys.argv[2]); "
            "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]; "
            "print(r['value_changed'][0]['differing'], hwm, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "a.pth"), str(tmp_path / "b.pth")],
                         capture_output=True, text=True, cwd=ROOT, check=True)
    differing, peak_kb, torch_loaded = out.stdout.split()
    assert int(differing) == 1
    assert int(peak_kb) * 1024 < 160 * 2**20, f"peak RSS {int(peak_kb) / 1024:.0f} MB for 256 MB tensors"
    assert torch_loaded == "False"  # the common path decodes with numpy


# --- unreadable and unsafe inputs ---------------------------------------------------------------

def _one_line_error(args, code):
    result = runner.invoke(app, ["diff", *map(str, args)])
    assert result.exit_code == code, (result.exit_code, result.output)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    return lines[0]


def test_unreadable_inputs(tmp_path):
    assert "no such file" in _one_line_error([tmp_path / "missing.pth", PRETRAIN], 2)
    assert "no such file" in _one_line_error([PRETRAIN, tmp_path / "missing.pth"], 2)
    trunc = tmp_path / "t.pth"
    trunc.write_bytes(PRETRAIN.read_bytes()[:5000])
    assert str(trunc) in _one_line_error([trunc, PRETRAIN], 2)
    notjson = tmp_path / "x.json"
    notjson.write_text('{"hello": 1}')
    assert "not an omgtool manifest" in _one_line_error([PRETRAIN, notjson], 2)
    result = runner.invoke(app, ["diff", str(trunc), str(PRETRAIN), "--json"])
    assert result.exit_code == 2 and json.loads(result.stdout)["exit_code"] == 2


class _System:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_unsafe_input_is_exit_3(tmp_path):
    marker = tmp_path / "ran"
    sd = collections.OrderedDict(w=tensor_entry("0", torch.FloatStorage, 4, (4,)), payload=_System(marker))
    evil = write_torch_zip(tmp_path / "evil.pth", data_pkl(sd, protocol=3), {"0": bytes(16)})
    for args in ([evil, PRETRAIN], [PRETRAIN, evil]):
        line = _one_line_error(args, 3)
        assert "unsafe pickle" in line and "system" in line
    assert not marker.exists()
