"""The fuzz harness (tests/fuzz) on a short, fixed budget, and every input it ever broke
omgtool with (tests/fuzz/regressions/, each with its expected exit code). The long run is
`make fuzz`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.cli_helpers import one_line_error, run
from tests.fuzz.run import run as fuzz
from tests.paths import ROOT

REGRESSIONS = Path(__file__).parent / "fuzz" / "regressions"
EXPECTED = json.loads((REGRESSIONS / "expected.json").read_text())
SHORT_CASES = 250


def test_short_fuzz_run_is_clean(tmp_path):
    summary = fuzz(SHORT_CASES, seed=12, work=tmp_path)
    assert summary.cases == SHORT_CASES
    assert summary.exits.get(0, 0) > 0 and summary.exits.get(2, 0) > 0  # it reaches both outcomes
    assert summary.failures == [], [(f.case, f.command, f.problem) for f in summary.failures[:5]]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_regression_file(name, tmp_path):
    want = EXPECTED[name]
    path = REGRESSIONS / name
    if "overlay" in want:  # a side file that broke a folder: put it back into a copy of that folder
        folder = tmp_path / "folder"
        shutil.copytree(ROOT / want["overlay"]["on"], folder)
        shutil.copy(path, folder / want["overlay"]["as"])
        path = folder
    for command, (code, needle) in want["commands"].items():
        words = command.format(path=path, tmp=tmp_path).split()
        result = run(*(str(ROOT / w) if w.startswith("fixtures/") else w for w in words))
        if code == 0:
            assert result.exit_code == 0, (command, result.output)
        else:
            one_line_error(result, code, needle)
        assert not (tmp_path / "o.safetensors").exists()
