"""Outputs never destroy inputs or foreign data (issue 13, item 2).

`--out` may not be, contain or sit inside an input; `--force` replaces only an empty folder or one
omgtool wrote; one writer per `--out` (a lock); SIGTERM/SIGHUP clean up like Ctrl-C; leftovers of a
`kill -9` are reported and removed by the next run; `--manifest` never overwrites without --force;
a `--out` ending in .safetensors is that file. Inputs are compared byte for byte (hashlib) before
and after; outputs are read with the safetensors library.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from safetensors import safe_open

from tests.cli_helpers import ok, one_line_error, run
from tests.paths import BASE, FINETUNE, PRETRAIN

ROOT = Path(__file__).resolve().parent.parent


def _error(result, code, *needles):
    """Exit `code` and exactly one `error:` line on stderr (progress lines may precede it) holding every needle."""
    assert result.exit_code == code, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and result.stderr.strip().endswith(errors[0]), result.stderr
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in errors[0], errors[0]


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        h.update(str(f.relative_to(path) if path.is_dir() else f.name).encode())
        h.update(f.read_bytes())
    return h.hexdigest()


@pytest.fixture
def work(tmp_path):
    ft = Path(shutil.copy(FINETUNE, tmp_path / "ft.pth"))
    base = Path(shutil.copytree(BASE, tmp_path / "base"))
    return tmp_path, ft, base


def test_out_equal_to_an_input_is_refused_even_with_force(work):
    tmp, ft, base = work
    before = _digest(ft)
    one_line_error(run("merge-lora", ft, "--base", base, "--out", ft, "--force"), 2, "is the checkpoint", str(ft))
    one_line_error(run("export", ft, "--to", "safetensors", "--out", ft, "--force"), 2, "is the source")
    one_line_error(run("export", base, "--to", "llama", "--out", base, "--force"), 2, "is the source")
    one_line_error(run("merge-lora", ft, "--base", base, "--out", base, "--force"), 2, "base")
    assert _digest(ft) == before and ft.is_file()
    assert (base / "config.json").is_file()
    assert sorted(p.name for p in tmp.iterdir()) == ["base", "ft.pth"]


def test_out_containing_or_inside_an_input_is_refused(work):
    tmp, ft, base = work
    one_line_error(run("merge-lora", ft, "--base", base, "-o", tmp, "--force"), 2, "contains the checkpoint")
    one_line_error(run("merge-lora", ft, "--base", base, "-o", base / "merged"), 2, "inside the base")
    one_line_error(run("export", ft, "--to", "safetensors", "--output", tmp, "--force"), 2, "contains the source")
    assert not (base / "merged").exists()
    assert sorted(p.name for p in tmp.iterdir()) == ["base", "ft.pth"]


def test_out_dot_is_refused_when_it_holds_the_inputs_and_works_when_empty(work, monkeypatch):
    tmp, ft, base = work
    monkeypatch.chdir(tmp)
    one_line_error(run("merge-lora", "ft.pth", "--base", "base", "--out", ".", "--force"), 2, "contains the checkpoint")
    assert sorted(p.name for p in tmp.iterdir()) == ["base", "ft.pth"]
    empty = tmp / "empty"
    empty.mkdir()
    monkeypatch.chdir(empty)
    ok("merge-lora", ft, "--base", base, "--out", ".", "--force", "--no-hash-base")
    assert (empty / "config.json").is_file() and (empty / "omgtool-merge.json").is_file()
    assert sorted(p.name for p in tmp.iterdir()) == ["base", "empty", "ft.pth"]  # no ..old-* / .partial-* left


def test_force_replaces_only_what_omgtool_wrote(work):
    tmp, ft, base = work
    project = tmp / "some" / "project"
    project.mkdir(parents=True)
    (project / "train.py").write_text("print('my work')\n")
    (project / "notes.md").write_text("mine\n")
    before = _digest(project)
    result = run("merge-lora", ft, "--base", base, "--out", project, "--force")
    one_line_error(result, 2, "omgtool did not write", "notes.md", "train.py", str(project))
    result = run("export", base, "--to", "llama", "--out", project, "--force")
    one_line_error(result, 2, "omgtool did not write")
    assert _digest(project) == before
    # a file where a folder goes
    stray = tmp / "stray"
    stray.write_text("x")
    one_line_error(run("merge-lora", ft, "--base", base, "--out", stray, "--force"), 2, "is a file")
    assert stray.read_text() == "x"
    # an empty folder, then omgtool's own output, may be replaced
    merged = tmp / "merged"
    merged.mkdir()
    ok("merge-lora", ft, "--base", base, "--out", merged, "--force", "--no-hash-base")
    first = json.loads((merged / "omgtool-merge.json").read_text())
    ok("merge-lora", ft, "--base", base, "--out", merged, "--force", "--alpha", "16", "--no-hash-base")
    assert json.loads((merged / "omgtool-merge.json").read_text())["alpha"] == 16 != first["alpha"]
    # an export folder without a record of its own gets omgtool-output.json, so --force may replace it later
    ok("export", ft, "--to", "safetensors", "--out", tmp / "st")
    assert (tmp / "st" / "omgtool-output.json").is_file()
    ok("export", ft, "--to", "safetensors", "--out", tmp / "st", "--force")
    assert not [p for p in tmp.iterdir() if ".partial-" in p.name or ".old-" in p.name or p.name.endswith(".lock")]


def test_out_ending_in_safetensors_is_that_file(work):
    tmp, ft, base = work
    target = tmp / "st.safetensors"
    ok("export", ft, "--to", "safetensors", "--out", target)
    assert target.is_file()
    with safe_open(str(target), "pt") as f:
        assert len(list(f.keys())) == 39 and f.metadata()["source"] == "ft.pth"
    one_line_error(run("export", ft, "--to", "safetensors", "--out", target), 2, "already exists")
    ok("export", ft, "--to", "safetensors", "--out", target, "--force")  # omgtool wrote it: replaceable
    foreign = tmp / "foreign.safetensors"
    from safetensors.torch import save_file
    import torch

    save_file({"w": torch.zeros(2)}, str(foreign))
    before = _digest(foreign)
    one_line_error(run("export", ft, "--to", "safetensors", "--out", foreign, "--force"), 2,
                   "a file omgtool did not write")
    assert _digest(foreign) == before
    one_line_error(run("export", base, "--to", "llama", "--out", tmp / "x.safetensors"), 2, "writes a folder")
    assert not (tmp / "x.safetensors").exists()


def test_manifest_is_never_overwritten_without_force(work):
    tmp, ft, base = work
    pinned = tmp / "pin.json"
    ok("inspect", PRETRAIN, "--manifest", pinned)
    before = pinned.read_bytes()
    one_line_error(run("inspect", ft, "--manifest", pinned), 2, "already exists", "--force")
    assert pinned.read_bytes() == before
    ok("inspect", ft, "--manifest", pinned, "--force")
    assert len(json.loads(pinned.read_text())["tensors"]) == 39
    digest = _digest(ft)
    one_line_error(run("inspect", ft, "--manifest", ft, "--force"), 2, "is the checkpoint")
    assert _digest(ft) == digest


# --- the lock, signals, leftovers ---------------------------------------------------------------

_SLOW_MERGE = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from omgtool.formats.writer import ShardedSafetensorsWriter
    flag = Path(sys.argv[1])
    real = ShardedSafetensorsWriter.write_rows
    calls = [0]
    def slow(self, name, blocks):
        real(self, name, blocks)
        calls[0] += 1
        if calls[0] == 3:  # some tensors are on disk in the partial folder
            flag.write_text("started")
            time.sleep(60)
    ShardedSafetensorsWriter.write_rows = slow
    from omgtool.cli import main
    sys.argv = ["omgtool", *sys.argv[2:]]
    main()
""")


def _start_slow_merge(tmp: Path, ft: Path, base: Path, out: Path):
    flag = tmp / f"started-{time.monotonic_ns()}"
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_MERGE, str(flag), "merge-lora", str(ft), "--base", str(base),
                             "--out", str(out), "--max-shard-size", "1MB", "--no-hash-base"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    deadline = time.monotonic() + 120
    while not flag.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the slow merge never started writing"
        time.sleep(0.05)
    return proc


def _leftovers(tmp: Path, name: str) -> list[str]:
    return sorted(p.name for p in tmp.iterdir() if p.name.startswith(f".{name}."))


def test_second_writer_to_the_same_out_fails_at_once(work):
    tmp, ft, base = work
    out = tmp / "merged"
    proc = _start_slow_merge(tmp, ft, base, out)
    try:
        started = time.monotonic()
        result = run("merge-lora", ft, "--base", base, "--out", out)
        one_line_error(result, 2, "being written by another omgtool process", f"pid {proc.pid}")
        result = run("export", ft, "--to", "safetensors", "--out", out, "--force")
        one_line_error(result, 2, "being written by another omgtool process")
        assert time.monotonic() - started < 30  # did not wait for the other writer
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
    assert not out.exists()


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGHUP, 129)])
def test_sigterm_and_sighup_clean_up_like_ctrl_c(work, sig, code):
    tmp, ft, base = work
    out = tmp / "merged"
    proc = _start_slow_merge(tmp, ft, base, out)
    assert any(".partial-" in n for n in _leftovers(tmp, "merged"))  # it is mid-write
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == code, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: terminated ({signal.Signals(sig).name})"], stderr
    assert "Traceback" not in stderr
    assert not out.exists() and _leftovers(tmp, "merged") == []


def test_kill_9_leftovers_are_reported_and_removed_by_the_next_run(work):
    tmp, ft, base = work
    out = tmp / "merged"
    proc = _start_slow_merge(tmp, ft, base, out)
    proc.kill()
    proc.communicate(timeout=60)
    left = [n for n in _leftovers(tmp, "merged") if ".partial-" in n]
    assert len(left) == 1 and any((tmp / left[0]).iterdir())
    result = ok("merge-lora", ft, "--base", base, "--out", out, "--no-hash-base")
    assert f"removed {left[0]}" in result.stderr and "killed" in result.stderr
    assert _leftovers(tmp, "merged") == [] and (out / "omgtool-merge.json").is_file()


# --- errors name the user's paths, in human units ------------------------------------------------

def test_write_errors_name_out_not_the_hidden_folder(work, monkeypatch):
    import errno

    from omgtool.formats.writer import ShardedSafetensorsWriter

    tmp, ft, base = work

    def full(self, shard):
        raise OSError(errno.ENOSPC, "No space left on device", str(self.folder / self.files[shard]))

    monkeypatch.setattr(ShardedSafetensorsWriter, "_open", full)
    result = run("merge-lora", ft, "--base", base, "--out", tmp / "merged", "--no-hash-base")
    _error(result, 2, "No space left on device", str(tmp / "merged" / "model.safetensors"))
    assert ".partial-" not in result.stderr
    assert _leftovers(tmp, "merged") == [] and not (tmp / "merged").exists()


def test_free_space_error_in_human_units(work, monkeypatch):
    import collections

    tmp, ft, base = work
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**12, 10**12 - 1500, 1500))
    result = run("merge-lora", ft, "--base", base, "--out", tmp / "merged")
    _error(result, 2, "not enough free disk space", "have 1.50 KB", "MB")
    assert "0.00 GB" not in result.stderr


def test_an_out_that_cannot_be_created_names_out(work):
    tmp, ft, base = work
    (tmp / "afile").write_text("x")
    result = run("merge-lora", ft, "--base", base, "--out", tmp / "afile" / "merged")
    one_line_error(result, 2, f"--out {tmp / 'afile' / 'merged'}", "cannot write in")
    assert (tmp / "afile").read_text() == "x"
