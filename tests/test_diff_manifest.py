"""Shape manifests: `inspect --manifest` output and the shipped real-size expected manifests,
read as checkpoints and diffed (names, shapes, dtypes; unexplained extras; --hash)."""

from __future__ import annotations

import collections
import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from fixtures import generate as gen
from omgtool.cli import app
from omgtool.errors import InvalidArgument, UnreadableInput
from omgtool.formats import open_checkpoint
from omgtool.formats.manifest import is_manifest
from omgtool.arch.infer import analyze

from tests.paths import FINETUNE, PRETRAIN, ROOT, TINY as FIXTURES
SHIPPED = ROOT / "mappings" / "manifests"
SHIPPED_PRETRAIN = SHIPPED / "omg_llava_7b_pretrain_8gpus.json"
SHIPPED_FINETUNE = SHIPPED / "omg_llava_7b_finetune_8gpus.json"
runner = CliRunner()


def diff(*args, code: int) -> dict:
    result = runner.invoke(app, ["diff", *map(str, args), "--json"])
    assert result.exit_code == code, (result.exit_code, result.output)
    return json.loads(result.stdout)


def write_manifest(ckpt: Path, out: Path, *extra: str) -> Path:
    result = runner.invoke(app, ["inspect", str(ckpt), "--manifest", str(out), "--json", *extra])
    assert result.exit_code == 0, result.output
    return out


def null_dtypes(path: Path) -> Path:
    m = json.loads(path.read_text())
    for t in m["tensors"]:
        t["dtype"] = None
    path.write_text(json.dumps(m))
    return path


# --- a checkpoint against its own manifest ------------------------------------------------------

@pytest.mark.parametrize("ckpt", [FINETUNE, PRETRAIN, FIXTURES / "internlm2-chat-tiny"])
def test_checkpoint_vs_own_manifest(tmp_path, ckpt):
    manifest = write_manifest(ckpt, tmp_path / "m.json")
    for args in ([manifest, ckpt], [ckpt, manifest], [manifest, ckpt, "--shapes-only"]):
        r = diff(*args, code=0)
        assert r["differences"] == 0 and r["values_compared"] is False
        assert r["summary"]["paired"] == len(open_checkpoint(ckpt).tensors)
    kinds = {r["a"]["kind"], r["b"]["kind"]}
    assert kinds == {"manifest", "checkpoint"}


def test_manifest_reports_tampering(tmp_path):
    manifest = write_manifest(FINETUNE, tmp_path / "m.json")
    sd = torch.load(FINETUNE, weights_only=True)
    bad = collections.OrderedDict(sd)
    bad["projector.model.model.0.weight"] = sd["projector.model.model.0.weight"].reshape(-1, 64).clone()
    del bad["projector.model.seperate_embed.weight"]
    bad["projector.model.model.2.bias"] = sd["projector.model.model.2.bias"].half()
    bad["projector.model.model.2.weight"] = sd["projector.model.model.2.weight"] + 1  # values: invisible
    path = gen.write_checkpoint(bad, tmp_path / "bad.pth")
    r = diff(manifest, path, code=1)
    assert [e["name"] for e in r["only_in_a"]] == ["projector.model.seperate_embed.weight"]
    assert [(e["a"], e["shape_a"], e["shape_b"]) for e in r["shape_changed"]] == [
        ("projector.model.model.0.weight", [512, 128], [1024, 64])]
    assert [(e["a"], e["dtype_a"], e["dtype_b"]) for e in r["dtype_changed"]] == [
        ("projector.model.model.2.bias", "F32", "F16")]
    assert r["value_changed"] == [] and r["differences"] == 3
    assert any("values not compared" in n for n in r["notes"])


def test_null_dtype_is_not_checked(tmp_path):
    manifest = null_dtypes(write_manifest(FINETUNE, tmp_path / "m.json"))
    sd = torch.load(FINETUNE, weights_only=True)
    half = collections.OrderedDict((k, v.half()) for k, v in sd.items())
    path = gen.write_checkpoint(half, tmp_path / "half.pth")
    assert diff(manifest, path, code=0)["dtype_changed"] == []
    strict = write_manifest(FINETUNE, tmp_path / "typed.json")  # with dtypes: every one differs
    assert len(diff(strict, path, code=1)["dtype_changed"]) == len(sd)


# --- unexplained extras --------------------------------------------------------------------------

def test_unexplained_extras_against_a_manifest(tmp_path):
    manifest = write_manifest(FINETUNE, tmp_path / "m.json")
    extra = gen.write_checkpoint(gen.finetune_state_dict(gen.TINY, extra_keys=3), tmp_path / "x.pth")
    names = gen.extra_key_names(3)
    r = diff(manifest, extra, "--shapes-only", code=0)
    assert [e["name"] for e in r["unexplained_only_in_b"]] == names
    assert all(e["group"] == "unexplained" for e in r["unexplained_only_in_b"])
    assert r["only_in_b"] == [] and r["unexplained_ignored"] == {"a": False, "b": True}
    assert r["differences"] == 0 and r["summary"]["unexplained_only_in_b"] == 0
    r = diff(manifest, extra, "--shapes-only", "--strict", code=1)
    assert r["differences"] == 3
    r = diff(extra, manifest, code=0)  # either side may be the manifest
    assert [e["name"] for e in r["unexplained_only_in_a"]] == names
    # between two checkpoints an unexplained key only in one is a difference (e.g. dropped by a conversion)
    r = diff(FINETUNE, extra, code=1)
    assert [e["name"] for e in r["unexplained_only_in_b"]] == names and r["differences"] == 3
    # a key the manifest lists, missing from the checkpoint, always fails
    with_extras = write_manifest(extra, tmp_path / "mx.json")
    r = diff(with_extras, FINETUNE, code=1)
    assert [e["name"] for e in r["unexplained_only_in_a"]] == names and r["differences"] == 3


# --- --hash --------------------------------------------------------------------------------------

def test_hash(tmp_path):
    manifest = write_manifest(FINETUNE, tmp_path / "m.json", "--hash")
    r = diff(manifest, FINETUNE, "--hash", code=0)
    assert r["hash"]["match"] is True and len(r["hash"]["expected"]) == 64
    sd = torch.load(FINETUNE, weights_only=True)
    sd["projector.model.model.0.bias"][0] += 1  # same names, shapes, dtypes: only the hash sees it
    path = gen.write_checkpoint(sd, tmp_path / "changed.pth")
    r = diff(manifest, path, "--hash", code=1)
    assert r["hash"]["match"] is False and r["summary"]["hash_changed"] == 1 and r["differences"] == 1
    diff(manifest, path, code=0)  # without --hash the shapes agree
    result = runner.invoke(app, ["diff", str(FINETUNE), str(FINETUNE), "--hash"])
    assert result.exit_code == 2 and "--hash needs" in result.stderr


# --- the shipped expected manifests ----------------------------------------------------------------

def _expected_real_layout() -> tuple[list, list]:
    """Names and shapes at real dims from the fixture generator's own layout tables."""
    spec = gen.real(32)
    projector = [(n, list(s)) for n, s, _ in gen._projector_layout(spec)]
    table = [spec.ckpt_vocab_size, spec.hidden_size]
    pretrain = [("llm.model.tok_embeddings.weight", table), ("llm.output.weight", table)] + projector
    p = gen.FT_PREFIX
    finetune = [(p + "model.tok_embeddings.weight", table), (p + "output.base_layer.weight", table)]
    dims = gen._lora_layer_dims(spec)
    for i in range(spec.num_layers):
        for t in gen.LORA_LAYER_TARGETS:
            out_f, in_f = dims[t]
            finetune += [(f"{p}model.layers.{i}.{t}.lora_A.default.weight", [spec.lora_rank, in_f]),
                         (f"{p}model.layers.{i}.{t}.lora_B.default.weight", [out_f, spec.lora_rank])]
    finetune += [(p + "output.lora_A.default.weight", [spec.lora_rank, spec.hidden_size]),
                 (p + "output.lora_B.default.weight", [spec.ckpt_vocab_size, spec.lora_rank])]
    return pretrain, finetune + projector


def test_shipped_manifests_match_the_real_layout():
    want_pre, want_ft = _expected_real_layout()
    for path, want, stage in ((SHIPPED_PRETRAIN, want_pre, "pretrain"), (SHIPPED_FINETUNE, want_ft, "finetune")):
        ckpt = open_checkpoint(path)
        assert is_manifest(ckpt)
        assert [(t.name, list(t.shape)) for t in ckpt.tensors.values()] == want
        assert all(t.dtype is None for t in ckpt.tensors.values())
        assert "not checked" in ckpt.metadata["note"]
        a = analyze(ckpt)
        assert (a.family_name, a.stage, a.unexplained) == ("omg-llava", stage, [])
        llm = a.architecture["llm"]
        assert (llm["vocab_size"], llm["hidden_size"], llm["num_attention_heads"]) == (92548, 4096, 32)
        # kv heads come from wqkv's rows: only the finetune file has wqkv (its LoRA B)
        assert llm["num_key_value_heads"] == (8 if stage == "finetune" else None)
        proj = a.architecture["projector"]
        assert (proj["clip_channels"], proj["query_channels"]) == (1536, 256)
    assert len(want_pre) == 17 and len(want_ft) == 339
    lora = analyze(open_checkpoint(SHIPPED_FINETUNE)).architecture["lora"]
    assert (lora["rank"], lora["num_pairs"], lora["scale"]) == (512, 161, 0.5)
    # spot checks against the public key listing (shared/seeds/000_*.txt)
    ft = open_checkpoint(SHIPPED_FINETUNE).tensors
    listing = {"llm.base_model.model.model.layers.0.attention.wqkv.lora_B.default.weight": (6144, 512),
               "llm.base_model.model.model.layers.1.feed_forward.w2.lora_A.default.weight": (512, 14336),
               "llm.base_model.model.model.layers.0.feed_forward.w1.lora_B.default.weight": (14336, 512)}
    for name, shape in listing.items():
        assert ft[name].shape == shape
    pre = open_checkpoint(SHIPPED_PRETRAIN).tensors
    assert pre["projector.model.model_feat.0.weight"].shape == (4096, 6656)
    assert pre["projector.model.seperate_embed.weight"].shape == (1, 4096)


def _real_shaped_file(path: Path, names_shapes, extra: int) -> Path:
    """A checkpoint with real names and shapes but 1-element storages (stride-0 views): a few KB."""
    sd = collections.OrderedDict()
    for name, shape in names_shapes:
        sd[name] = torch.zeros(1, dtype=torch.bfloat16).expand(*shape)
    for name in gen.extra_key_names(extra):
        sd[name] = torch.zeros(16, 16)
    torch.save(sd, path)
    assert path.stat().st_size < 2_000_000
    return path


def test_shipped_finetune_manifest_vs_a_449_key_file(tmp_path):
    """The user's question: is my download intact? 339 known keys + 110 unexplained ones."""
    _, layout = _expected_real_layout()
    real = _real_shaped_file(tmp_path / "omg_llava_7b_finetune_8gpus.pth", layout, extra=110)
    assert len(open_checkpoint(real).tensors) == 449
    r = diff(SHIPPED_FINETUNE, real, "--shapes-only", code=0)
    assert r["summary"]["paired"] == 339 and len(r["unexplained_only_in_b"]) == 110
    assert r["differences"] == 0 and r["only_in_a"] == r["only_in_b"] == []
    result = runner.invoke(app, ["diff", str(SHIPPED_FINETUNE), str(real), "--shapes-only"])
    assert result.exit_code == 0 and "unexplained, only in B (110)" in result.stdout
    assert "no differences" in result.stdout
    # a truncated download that lost a layer's LoRA, and a wrong-vocab table, fail
    broken = [(n, s) for n, s in layout if ".layers.31.feed_forward.w2." not in n]
    broken = [(n, [92544, 4096] if n.endswith("tok_embeddings.weight") else s) for n, s in broken]
    bad = _real_shaped_file(tmp_path / "bad.pth", broken, extra=110)
    r = diff(SHIPPED_FINETUNE, bad, "--shapes-only", code=1)
    assert len(r["only_in_a"]) == 2 and len(r["rows_removed"]) == 1
    assert r["rows_removed"][0]["count"] == 4 and r["rows_removed"][0]["first"] == 92544


def test_shipped_pretrain_vs_finetune_manifests():
    r = diff(SHIPPED_PRETRAIN, SHIPPED_FINETUNE, code=1)
    assert r["summary"]["paired"] == 17 and len(r["renamed"]) == 2
    assert len(r["only_in_b"]) == 322 and r["shape_changed"] == [] and r["values_compared"] is False


def test_tiny_fixture_is_not_the_real_model():
    r = diff(SHIPPED_PRETRAIN, PRETRAIN, "--shapes-only", code=1)
    assert len(r["shape_changed"]) + len(r["rows_removed"]) == 17


# --- reading manifests -------------------------------------------------------------------------

@pytest.mark.parametrize("mutate,needle", [
    (lambda m: m.update(format_version=99), "format_version 99"),
    (lambda m: m.pop("tensors"), "not an omgtool manifest"),
    (lambda m: m["tensors"][0].pop("dtype"), "has no dtype"),
    (lambda m: m["tensors"][0].update(dtype="float32"), "unknown dtype"),
    (lambda m: m["tensors"][0].update(shape=[-1, 2]), "shape must be"),
    (lambda m: m["tensors"].append(dict(m["tensors"][0])), "twice"),
])
def test_bad_manifest_is_exit_2(tmp_path, mutate, needle):
    m = json.loads(write_manifest(PRETRAIN, tmp_path / "m.json").read_text())
    mutate(m)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(m))
    result = runner.invoke(app, ["diff", str(path), str(PRETRAIN)])
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith(f"error: {path}: ") and needle in result.stderr
    with pytest.raises(UnreadableInput):
        open_checkpoint(path)


def test_manifest_holds_no_values(tmp_path):
    ckpt = open_checkpoint(write_manifest(PRETRAIN, tmp_path / "m.json"))
    with pytest.raises(InvalidArgument):
        ckpt.read("llm.output.weight")
    result = runner.invoke(app, ["inspect", str(tmp_path / "m.json"), "--stats"])
    assert result.exit_code == 2 and "no values" in result.stderr
    result = runner.invoke(app, ["inspect", str(SHIPPED_FINETUNE), "--json"])
    assert result.exit_code == 0 and json.loads(result.stdout)["architecture"]["stage"] == "finetune"
