"""The CLI behaves like the tools people know (issue 13, items 3 and 4).

Names are never cut (an 80-column pseudo-terminal and a pipe, checked against the tensor names
torch's own loader lists), colour only where it belongs, ASCII when the locale cannot encode,
--version/-V, -o/--output, -q/--quiet, --debug after the subcommand, --json errors as one object
for every command, a closed pipe exits 0 quietly, exit codes in every --help, fail-fast checks.
"""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import shutil
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest
import torch

from tests.cli_helpers import ok, one_line_error, run
from tests.paths import BASE, FINETUNE, PRETRAIN

ROOT = Path(__file__).resolve().parent.parent
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
CMD = [sys.executable, "-m", "omgtool.cli"]


def _names(pattern: str) -> list[str]:
    """Tensor names as torch's own loader sees them (the oracle)."""
    import fnmatch

    sd = torch.load(FINETUNE, map_location="cpu", weights_only=True, mmap=True)
    return [k for k in sd if fnmatch.fnmatchcase(k, pattern)]


def _pty_run(args: list[str], cols: int = 80, env: dict | None = None) -> tuple[int, str]:
    """Run the CLI with stdout and stderr on a pseudo-terminal of `cols` columns."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, cols, 0, 0))
    full_env = {**os.environ, "COLUMNS": str(cols), "TERM": "xterm-256color"}
    full_env.pop("NO_COLOR", None)
    full_env.update(env or {})
    proc = subprocess.Popen([*CMD, *args], stdin=slave, stdout=slave, stderr=slave, env=full_env, cwd=ROOT,
                            close_fds=True)
    os.close(slave)
    chunks = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.5)
        if ready:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        elif proc.poll() is not None:
            break
    proc.wait(timeout=60)
    os.close(master)
    return proc.returncode, b"".join(chunks).decode("utf-8", "replace").replace("\r\n", "\n")


def test_names_never_cut_in_an_80_column_terminal():
    names = _names("*lora_B*")
    code, raw = _pty_run(["inspect", str(FINETUNE), "--filter", "*lora_B*", "--stats"], cols=80)
    assert code == 0, raw
    text = ANSI.sub("", raw)
    assert "…" not in text
    lines = text.splitlines()
    for name in names:  # every name whole on one line, twice (the listing and the stats table)
        assert sum(1 for line in lines if name in line.split()) == 2, name
    assert "\x1b[" in raw  # a terminal gets colour


def test_names_never_cut_when_piped_and_grep_finds_them():
    names = _names("*")
    result = subprocess.run([*CMD, "inspect", str(FINETUNE), "--filter", "*", "--stats"], capture_output=True,
                            text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert "…" not in result.stdout and "\x1b[" not in result.stdout
    lines = result.stdout.splitlines()
    for name in names:
        hits = [line for line in lines if name in line.split()]
        assert len(hits) == 2, name
    wqkv = [n for n in names if n.endswith("wqkv.lora_B.default.weight")]
    grep = subprocess.run(["grep", "-F", "wqkv.lora_B.default.weight"], input=result.stdout, capture_output=True,
                          text=True)
    assert all(n in grep.stdout for n in wqkv) and len(grep.stdout.splitlines()) == 2 * len(wqkv)


def test_heatmap_cells_keep_their_numbers():
    report = json.loads(ok("inspect", FINETUNE, "--stats", "--json").stdout)
    text = ok("inspect", FINETUNE, "--stats").stdout
    assert "…" not in text
    section = text[text.index("LoRA update strength"):]
    for row in report["update_strength"]:
        assert f"{row['delta_fro']:.4g}" in section, row


def test_no_color_flag_and_env_give_plain_text_on_a_terminal():
    for args, env in ((["--no-color"], None), ([], {"NO_COLOR": "1"})):
        code, raw = _pty_run(["inspect", str(FINETUNE), *args], env=env)
        assert code == 0, raw
        assert "\x1b[" not in raw.replace("\x1b[?25l", "").replace("\x1b[?25h", ""), raw[:400]


def test_a_locale_that_cannot_encode_gets_ascii():
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}
    env.pop("PYTHONIOENCODING", None)
    result = subprocess.run([*CMD, "inspect", str(FINETUNE), "--stats"], capture_output=True, env=env, cwd=ROOT)
    assert result.returncode == 0, result.stderr.decode()
    out = result.stdout.decode("ascii")  # raises if anything non-ASCII got through
    assert "torch-zip | 39 tensors" in out and "Traceback" not in result.stderr.decode("ascii")


def test_version_and_output_alias():
    for flag in ("--version", "-V"):
        result = ok(flag)
        assert result.stdout.strip() == f"omgtool {__import__('omgtool').__version__}"
    for cmd in ("merge-lora", "export"):
        help_text = ok(cmd, "--help").stdout
        assert "-o, --out, --output" in help_text or ("--out" in help_text and "-o" in help_text and "--output" in help_text)


def test_quiet_prints_nothing_and_keeps_the_exit_code(tmp_path):
    result = run("inspect", FINETUNE, "-q")
    assert result.exit_code == 0 and result.stdout == "" and result.stderr == ""
    result = run("diff", PRETRAIN, FINETUNE, "--quiet")
    assert result.exit_code == 1 and result.stdout == ""
    result = run("-q", "merge-lora", FINETUNE, "--base", BASE, "-o", tmp_path / "m", "--no-hash-base")
    assert result.exit_code == 0 and result.stdout == "" and result.stderr == ""
    assert (tmp_path / "m" / "omgtool-merge.json").is_file()
    one_line_error(run("inspect", tmp_path / "missing.pth", "-q"), 2, "missing.pth")  # errors still show


def test_debug_after_the_subcommand(monkeypatch):
    import omgtool.cli.inspect as inspect_cli

    def boom(*a, **k):
        raise RuntimeError("kaboom")

    monkeypatch.setattr(inspect_cli, "build_report", boom)
    plain = run("inspect", FINETUNE)
    one_line_error(plain, 4, "internal error: RuntimeError: kaboom", "--debug")
    for args in (("inspect", FINETUNE, "--debug"), ("--debug", "inspect", FINETUNE)):
        result = run(*args)
        assert result.exit_code == 4
        assert "Traceback" in result.stderr and "kaboom" in result.stderr
        assert result.stderr.strip().splitlines()[-1].startswith("error: internal error")


@pytest.mark.parametrize("args,code", [
    (("inspect", "{missing}", "--json"), 2),
    (("diff", "{missing}", str(PRETRAIN), "--json"), 2),
    (("merge-lora", str(FINETUNE), "--base", "{missing}", "--out", "{out}", "--json"), 2),
    (("export", str(FINETUNE), "--to", "gguf", "--out", "{out}", "--json"), 2),
    (("export", str(FINETUNE), "--out", "{out}", "--json"), 2),  # usage error: --to missing
    (("verify", "{missing}", "--json"), 2),
    (("inspect", str(FINETUNE), "--json", "--stats", "--bogus"), 2),  # unknown option
])
def test_json_errors_are_one_object_for_every_command(tmp_path, args, code):
    args = [a.format(missing=tmp_path / "missing", out=tmp_path / "out") for a in args]
    result = run(*args)
    assert result.exit_code == code, result.output
    obj = json.loads(result.stdout)
    assert set(obj) >= {"error", "exit_code"} and obj["exit_code"] == code
    errors = result.stderr.strip().splitlines()
    assert errors == [f"error: {obj['error']}"], result.stderr
    assert "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_a_closed_pipe_exits_0_quietly():
    for args in (["inspect", str(FINETUNE), "--filter", "*"], ["diff", str(PRETRAIN), str(FINETUNE)],
                 ["inspect", str(FINETUNE), "--json"]):
        proc = subprocess.Popen([*CMD, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
        proc.stdout.close()  # the reader is gone before the first byte is written (`| head -0`)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err.decode()
        assert err.decode().strip() == "", err.decode()


@pytest.mark.parametrize("command", ["inspect", "diff", "merge-lora", "export", "verify"])
def test_every_help_lists_the_exit_codes(command):
    text = " ".join(ok(command, "--help").stdout.split())
    for needle in ("Exit codes:", "2 unreadable", "3 unsafe", "4 internal error", "130 interrupted",
                   "143 terminated", "--debug", "-q, --quiet", "--no-color"):
        assert needle in text, (command, needle)
    top = " ".join(ok("--help").stdout.split())
    assert "143" in top and "130" in top and "OMGTOOL_MAPPINGS" in top


def test_errors_list_the_valid_values(tmp_path):
    result = run("inspect", FINETUNE, "--family", "nope")
    one_line_error(result, 2, "'nope'", "omg-llava", "internlm2", "llama")
    one_line_error(run("export", FINETUNE, "--to", "gguf", "--out", tmp_path / "x"), 2, "llama, peft, safetensors")
    one_line_error(run("frobnicate"), 2, "inspect", "merge-lora")


def test_verify_fails_fast_before_any_model_loads(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("the --device-map check is for CPU-only machines")
    # a GPU budget without a GPU (plain --device-map auto works on CPU: cpu + disk offload)
    result = run("verify", BASE, "--device-map", "auto", "--max-memory", "0=20GiB,cpu=64GB")
    one_line_error(result, 2, "--max-memory gives GPU 0", "no CUDA GPU")
    result = run("verify", BASE, "--image", tmp_path / "nope.jpg", "--device", "cpu")
    one_line_error(result, 2, "nope.jpg", "no such image file")
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    one_line_error(run("verify", BASE, "--image", bad, "--device", "cpu"), 2, "not a readable image")
    # the tiny base has 320 embedding rows, the finetune adapter 324: caught from headers alone
    result = run("verify", BASE, "--adapter", FINETUNE, "--device", "cpu")
    one_line_error(result, 2, "324 vocab rows", "320", "do not fit")
    assert "loading the LLM" not in result.stderr
