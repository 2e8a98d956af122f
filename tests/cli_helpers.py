"""Shared test helpers: run the CLI in-process and check its one-line errors."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from omgtool.cli import app

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def ok(*args):
    result = run(*args)
    assert result.exit_code == 0, result.output
    return result


def one_line_error(result, code, *needles):
    """Exit `code`, exactly one `error: ...` line on stderr holding every needle, no traceback."""
    assert result.exit_code == code, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in lines[0], lines[0]


def folder_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a folder's model*.safetensors shards (through the safetensors library)."""
    out = {}
    for f in sorted(Path(folder).glob("model*.safetensors")):
        out.update(load_file(str(f)))
    return out
