"""`omgtool scan`, and `--allow-global` on inspect / diff / export."""

from __future__ import annotations

import argparse
import collections
import json
import os
import pickle

import torch
from typer.testing import CliRunner

from omgtool.cli import app

runner = CliRunner()


class _System:
    def __init__(self, canary):
        self.canary = str(canary)

    def __reduce__(self):
        return os.system, (f"touch {self.canary}",)


def _lightning_like(path):
    """A Lightning-style checkpoint: tensors under state_dict, hparams as argparse.Namespace."""
    torch.manual_seed(0)
    sd = collections.OrderedDict(layer=torch.randn(3, 4), bias=torch.randn(4).to(torch.bfloat16))
    torch.save({"state_dict": sd, "hyper_parameters": argparse.Namespace(lr=0.1), "epoch": 3}, path)
    return path


def _mixed_folder(tmp_path):
    folder = tmp_path / "models"
    (folder / "sub").mkdir(parents=True)
    torch.save({"w": torch.ones(2)}, folder / "good.pth")
    _lightning_like(folder / "sub" / "lightning.ckpt")
    (folder / "sub" / "evil.bin").write_bytes(pickle.dumps(_System(tmp_path / "canary"), protocol=2))
    (folder / "notes.txt").write_text("hello")
    return folder


def test_scan_folder_lines_summary_and_exit(tmp_path):
    folder = _mixed_folder(tmp_path)
    result = runner.invoke(app, ["scan", str(folder)])
    assert result.exit_code == 3
    lines = dict(line.split("\t", 1) for line in result.stdout.splitlines())
    assert set(lines) == {str(folder / n) for n in ("good.pth", "notes.txt", "sub/evil.bin", "sub/lightning.ckpt")}
    assert lines[str(folder / "good.pth")].startswith("safe\ttorch-zip")
    assert lines[str(folder / "sub/evil.bin")].startswith("dangerous\tpickle\tposix.system (GLOBAL @")
    assert lines[str(folder / "sub/lightning.ckpt")].startswith("unknown\ttorch-zip\targparse.Namespace")
    assert "scanned 4 files: 2 safe, 1 unknown, 1 dangerous" in result.stderr
    assert not (tmp_path / "canary").exists()


def test_scan_json_lines(tmp_path):
    folder = _mixed_folder(tmp_path)
    result = runner.invoke(app, ["scan", str(folder), "--json", "--allow-global", "argparse.Namespace"])
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(rows) == 4 and result.exit_code == 3
    by_name = {os.path.basename(r["path"]): r for r in rows}
    assert by_name["lightning.ckpt"]["verdict"] == "safe"  # allowed
    evil = by_name["evil.bin"]
    assert evil["verdict"] == "dangerous"
    assert set(evil["findings"][0]) == {"global", "grade", "opcode", "member", "offset", "why"}


def test_scan_exit_codes(tmp_path):
    clean = tmp_path / "clean"
    clean.mkdir()
    torch.save({"w": torch.ones(2)}, clean / "a.pth")
    assert runner.invoke(app, ["scan", str(clean)]).exit_code == 0
    full = (clean / "a.pth").read_bytes()
    (clean / "truncated.pth").write_bytes(full[:40])
    result = runner.invoke(app, ["scan", str(clean)])
    assert result.exit_code == 2 and "unreadable" in result.stdout
    assert runner.invoke(app, ["scan", str(tmp_path / "missing.pth")]).exit_code == 2


def test_scan_hf_cache_layout(tmp_path):
    """blobs + snapshot links: each file once, by its snapshot name."""
    repo = tmp_path / "hub" / "models--org--tiny"
    (repo / "blobs").mkdir(parents=True)
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    blob = repo / "blobs" / "0123456789abcdef"
    blob.write_bytes(pickle.dumps(_System(tmp_path / "canary"), protocol=2))
    (repo / "snapshots" / "abc123" / "pytorch_model.bin").symlink_to(blob)
    result = runner.invoke(app, ["scan", str(tmp_path / "hub"), "--json"])
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [os.path.basename(r["path"]) for r in rows] == ["pytorch_model.bin"]
    assert rows[0]["verdict"] == "dangerous" and result.exit_code == 3


def test_allow_global_exports_a_lightning_checkpoint(tmp_path):
    ckpt = _lightning_like(tmp_path / "run.ckpt")
    refused = runner.invoke(app, ["inspect", str(ckpt), "--json"])
    assert refused.exit_code == 3 and "--allow-global" in refused.stderr
    report = json.loads(refused.stdout)
    assert report["safety"]["verdict"] == "unknown"
    assert sorted(t["name"] for t in report["tensors"]) == ["bias", "layer"]  # listed, never executed
    ok = runner.invoke(app, ["inspect", str(ckpt), "--allow-global", "argparse.Namespace"])
    assert ok.exit_code == 0, ok.output
    out = tmp_path / "run.safetensors"
    assert runner.invoke(app, ["export", str(ckpt), "--to", "safetensors", "--out", str(out)]).exit_code == 3
    exported = runner.invoke(app, ["export", str(ckpt), "--to", "safetensors", "--out", str(out),
                                   "--allow-global", "argparse.Namespace"])
    assert exported.exit_code == 0, exported.output
    from safetensors.torch import load_file

    with torch.serialization.safe_globals([argparse.Namespace]):
        oracle = torch.load(ckpt, weights_only=True)["state_dict"]
    written = load_file(out)
    assert set(written) == set(oracle)
    for name, tensor in oracle.items():
        assert written[name].dtype == tensor.dtype and torch.equal(written[name], tensor)
    diff = runner.invoke(app, ["diff", str(ckpt), str(out), "--allow-global", "argparse.Namespace"])
    assert diff.exit_code == 0, diff.output


def test_allow_global_never_accepts_dangerous(tmp_path):
    evil = tmp_path / "evil.pth"
    evil.write_bytes(pickle.dumps({"w": _System(tmp_path / "canary")}, protocol=2))
    result = runner.invoke(app, ["inspect", str(evil), "--allow-global", f"{os.system.__module__}.system"])
    assert result.exit_code == 2 and "dangerous global cannot be allowed" in result.stderr
    result = runner.invoke(app, ["scan", str(evil), "--allow-global", "argparse.Namespace"])
    assert result.exit_code == 3
    assert not (tmp_path / "canary").exists()
