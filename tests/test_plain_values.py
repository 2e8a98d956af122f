"""omgtool/cli/plain_values.py: every command's plain parameters take their values without
pydantic, and exactly as Typer's own (pydantic) coercion takes them."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer._click.exceptions import BadParameter
from typer._coercion import build_runtime_param

from omgtool.cli import plain_values
from omgtool.cli.app import COMMANDS, build_command
from tests.paths import FINETUNE

ROOT = Path(__file__).resolve().parent.parent

SAMPLES = {
    int: ["5", " 5 ", "+7", "-3", "0", "007", "5.0", "5.00", "-5.0", "5.5", "1_000", "1__0", "_1", "1e3",
          "0x10", "\u0663", "", " ", "nan", "inf", "9" * 5000, "5.0.0", ".0", "5.", "12a"],
    float: ["1", "1.5", " 2.5 ", "-0.0", "nan", "NaN", "inf", "-Infinity", "1e400", ".5", "5.", "1e-3",
            "1_0.5", "\u0663", "", "abc", "0x10", "1,5"],
    str: ["", "x", " spaced ", "ünïcode", "*.lora_B.*", "--"],
    bool: ["true", "False", "1", "0", "yes", "no", "on", "off", "", " t ", "maybe"],
}


def _outcome(runtime, value, param, ctx):
    try:
        got = runtime.coerce(value, param=param, ctx=ctx)
    except BadParameter:
        return "refused"
    if isinstance(got, float) and math.isnan(got):
        return ("nan", type(got))
    return (got, type(got))


def _plain_params():
    for name in COMMANDS:
        command = build_command(name)
        if command is None:
            continue
        for param in command.params:
            runtime = getattr(param, "_runtime_param", None)
            if isinstance(runtime, plain_values._runtime_class()):
                yield name, command, param, runtime


def test_every_parameter_of_every_command_is_plain():
    seen = {}
    for name in COMMANDS:
        command = build_command(name)
        for param in command.params:
            seen[f"{name} {param.name}"] = isinstance(getattr(param, "_runtime_param", None),
                                                     plain_values._runtime_class())
    missing = [k for k, plain in seen.items() if not plain]
    assert len(seen) > 60 and missing == []


def test_values_are_taken_as_typer_takes_them(tmp_path):
    existing = tmp_path / "file.bin"
    existing.write_bytes(b"x")
    path_samples = ["a", "", ".", str(tmp_path / "missing" / "x"), str(existing), str(tmp_path)]
    compared = 0
    for name, command, param, ours in _plain_params():
        typers = build_runtime_param(param.type_descriptor)
        ctx = command.context_class(command)
        leaf = ours.leaf
        for value in (path_samples if leaf is Path else SAMPLES[leaf]):
            if ours.annotation != leaf:  # a list parameter: Typer passes the values as a tuple
                value = (value, value)
            assert _outcome(ours, value, param, ctx) == _outcome(typers, value, param, ctx), (name, param.name, value)
            compared += 1
    assert compared > 400


def test_range_and_refusal_messages(tmp_path):
    command = build_command("diff")
    (show,) = [p for p in command.params if p.name == "show"]
    ctx = command.context_class(command)
    with pytest.raises(BadParameter, match="greater than or equal to 1"):
        show.get_runtime_param().coerce("0", param=show, ctx=ctx)
    assert show.get_runtime_param().coerce("3", param=show, ctx=ctx) == 3


def test_a_short_command_imports_no_pydantic(tmp_path):
    env = {**os.environ, "OMGTOOL_CACHE_DIR": str(tmp_path / "cache")}
    code = ("import sys, runpy; sys.argv = ['omgtool', 'inspect', sys.argv[1], '--json']\n"
            "try:\n    runpy.run_module('omgtool.cli', run_name='__main__')\n"
            "except SystemExit as e:\n    assert e.code in (0, None), e.code\n"
            "print('pydantic' in sys.modules, 'torch' in sys.modules, file=sys.stderr)")
    runs = [subprocess.run([sys.executable, "-c", code, str(FINETUNE)], capture_output=True, text=True, env=env,
                           cwd=ROOT) for _ in range(2)]
    assert [r.returncode for r in runs] == [0, 0], runs[0].stderr + runs[1].stderr
    assert runs[0].stderr.split()[-2:] == ["True", "False"]  # cold: the mappings are validated
    assert runs[1].stderr.split()[-2:] == ["False", "False"]  # warm: neither pydantic nor torch
    assert runs[0].stdout == runs[1].stdout
