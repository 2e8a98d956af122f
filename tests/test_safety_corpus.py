"""The project's corpus (tests/safety_corpus.py): every malicious file is flagged, never
run, and proven live under the loader a real program would use; every benign file stays safe.
"""

from __future__ import annotations

import json
import pickletools
from pathlib import Path

import pytest
from typer.testing import CliRunner

from omgtool.cli import app
from omgtool.formats.scan import scan_file
from tests.safety_corpus import build, prove_live

runner = CliRunner()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    cases = build(folder, tmp_path_factory.mktemp("canaries"))
    return folder, cases


@pytest.fixture(scope="module")
def scanned(corpus):
    """One `omgtool scan --json` over the whole corpus folder, before any payload is proven."""
    folder, cases = corpus
    result = runner.invoke(app, ["scan", str(folder), "--json"])
    rows = {Path(r["path"]).name: r for r in map(json.loads, result.stdout.splitlines())}
    assert not any(Path(c.canary).exists() for c in cases if c.canary), "omgtool ran a payload"
    return result, rows


def test_every_case_has_its_expected_verdict(corpus, scanned):
    folder, cases = corpus
    result, rows = scanned
    assert result.exit_code == 3
    wrong = {c.name: (c.expect, rows[c.name]["verdict"]) for c in cases if rows[c.name]["verdict"] != c.expect}
    assert wrong == {}
    classes = {c.cls for c in cases}
    assert {"bare pickle", "concatenated pickles", "legacy torch", "torch zip", "FRAME overrun",
            "dangerous in tensor rebuild", "zip member tricks", "zip polyglot", "embedded pickle",
            "numpy object array", "legacy tar", "malformed after payload", "not a checkpoint",
            "benign", "unknown"} <= classes


def test_malicious_cases_are_live_and_flagged(corpus, scanned):
    """No file that runs code under its loader is safe or unreadable (exit 2)."""
    folder, cases = corpus
    _, rows = scanned
    live = prove_live(cases, folder)
    assert live and all(live.values()), [name for name, ok in live.items() if not ok]
    for name in live:
        assert rows[name]["verdict"] == "dangerous", name
        assert any(f["grade"] == "dangerous" for f in rows[name]["findings"]), name


def test_each_malicious_file_exits_3_under_inspect(corpus):
    folder, cases = corpus
    for case in cases:
        if case.loader is None:
            continue
        result = runner.invoke(app, ["inspect", str(folder / case.name)])
        assert result.exit_code == 3, (case.name, result.output)
        assert result.stderr.startswith("error: ") and "dangerous" in result.stderr, case.name
        assert "Traceback" not in result.output


def test_benign_files_inspect_cleanly(corpus):
    folder, cases = corpus
    for case in cases:
        # a bare tensor is safe (scan verdict above) but not a state dict the readers list
        if case.expect == "safe" and case.name.endswith(".pth") and case.name != "benign_bare_tensor.pth":
            result = runner.invoke(app, ["inspect", str(folder / case.name), "--json"])
            assert result.exit_code == 0, (case.name, result.output)
            assert json.loads(result.stdout)["safety"]["verdict"] == "safe"


def test_frame_overrun_fools_pickletools_but_not_omgtool(corpus):
    """pickletools.genops reads straight through the FRAME and sees no global at all: a
    genops-based scanner calls it clean. torch's C unpickler runs os.system."""
    import zipfile

    folder, _ = corpus
    raw = zipfile.ZipFile(folder / "zip_frame_overrun.pth").read("archive/data.pkl")
    ops = [op.name for op, _, _ in pickletools.genops(raw)]
    assert "STACK_GLOBAL" not in ops and "GLOBAL" in ops  # only the state dict's own globals
    names = {arg for op, arg, _ in pickletools.genops(raw) if op.name == "GLOBAL"}
    assert all(n.startswith(("torch", "collections")) for n in names)
    result = scan_file(folder / "zip_frame_overrun.pth")
    assert result.verdict == "dangerous"
    assert {f.target for f in result.findings} >= {f"{__import__('os').system.__module__}.system",
                                                   "<FRAME overrun>"}


def test_payload_before_a_state_dict_still_lists_its_tensors(corpus):
    """STOP returns the top of the stack (CPython): the weights are there, and so is the payload."""
    folder, _ = corpus
    result = runner.invoke(app, ["inspect", str(folder / "zip_payload_before_state_dict.pth"), "--json"])
    assert result.exit_code == 3
    report = json.loads(result.stdout)
    assert [t["name"] for t in report["tensors"]] == ["w"]
    assert report["safety"]["verdict"] == "dangerous"


def test_torchscript_is_named(tmp_path):
    import torch

    class M(torch.nn.Module):
        def forward(self, x):
            return x + 1

    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(M()), path)
    result = runner.invoke(app, ["inspect", str(path)])
    assert result.exit_code == 3
    assert "TorchScript archive" in result.stderr
    assert scan_file(path).kind == "torchscript"
