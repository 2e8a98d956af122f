"""The wheel is a working tool: build it, install it into a fresh venv outside the repository,
and run inspect, `diff --shapes-only` against a shipped manifest and a tiny merge from there.

The fresh venv gets the wheel (and nothing of the repository); the heavy dependencies (torch,
transformers, ...) are borrowed from the test venv's site-packages through a `.pth` line, which
adds that folder to sys.path *after* the venv's own site-packages without running its `.pth`
files, so the editable omgtool of the test venv stays invisible (asserted below).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tests.paths import BASE, FINETUNE, PRETRAIN

ROOT = Path(__file__).resolve().parent.parent


def _run(cmd, **kw):
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    work = tmp_path_factory.mktemp("wheel")
    dist = work / "dist"
    built = _run([sys.executable, "-m", "pip", "wheel", ROOT, "--no-deps", "--no-build-isolation", "-q", "-w", dist],
                 cwd=work)  # the test venv's setuptools: no index needed
    assert built.returncode == 0, built.stderr[-2000:]
    wheel = next(dist.glob("omgtool-*.whl"))
    venv = work / "venv"
    made = _run([sys.executable, "-m", "venv", venv])
    assert made.returncode == 0, made.stderr
    py = venv / "bin" / "python"
    inst = _run([py, "-m", "pip", "install", "-q", "--no-deps", "--no-index", wheel])
    assert inst.returncode == 0, inst.stderr[-2000:]
    site = Path(_run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    (site / "zz_borrowed_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "OMGTOOL_MAPPINGS", "VIRTUAL_ENV")}
    run_dir = work / "elsewhere"
    run_dir.mkdir()
    return {"venv": venv, "py": py, "omgtool": venv / "bin" / "omgtool", "env": env, "cwd": run_dir, "site": site}


def _tool(installed, *args):
    return _run([installed["omgtool"], *args], cwd=installed["cwd"], env=installed["env"])


def test_wheel_ships_the_mappings_and_imports_from_the_venv(installed):
    where = _run([installed["py"], "-c", "import omgtool, omgtool.arch.mapping as m; "
                  "print(omgtool.__file__); print(m.mappings_dir())"], cwd=installed["cwd"], env=installed["env"])
    assert where.returncode == 0, where.stderr
    module, mappings = (Path(line) for line in where.stdout.split())
    assert module.is_relative_to(installed["site"]) and not module.is_relative_to(ROOT)
    assert mappings == installed["site"] / "omgtool" / "mappings"
    shipped = sorted(p.name for p in mappings.glob("*.toml"))
    assert shipped == sorted(p.name for p in (ROOT / "mappings").glob("*.toml"))
    assert (mappings / "manifests" / "omg_llava_7b_pretrain_8gpus.json").is_file()
    version = _tool(installed, "--version")
    assert version.returncode == 0 and version.stdout.startswith("omgtool ")


def test_installed_tool_inspects_diffs_and_merges(installed, tmp_path):
    work = installed["cwd"]
    ft = shutil.copy(FINETUNE, work / "ft.pth")
    pre = shutil.copy(PRETRAIN, work / "pre.pth")
    base = shutil.copytree(BASE, work / "base")

    result = _tool(installed, "inspect", ft, "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["architecture"]["family"] == "omg-llava" and report["architecture"]["stage"] == "finetune"
    assert report["unexplained"] == []

    # the shipped manifest of the released 17-key pretrain file: same names, real-size shapes
    manifest = installed["site"] / "omgtool" / "mappings" / "manifests" / "omg_llava_7b_pretrain_8gpus.json"
    result = _tool(installed, "diff", manifest, pre, "--shapes-only", "--json")
    assert result.returncode == 1, result.stderr
    diff = json.loads(result.stdout)
    expected = json.loads(manifest.read_text())
    assert diff["only_in_a"] == [] and diff["only_in_b"] == []
    assert diff["summary"]["paired"] == len(expected["tensors"]) == 17
    assert {r["a"] for r in diff["shape_changed"]} <= {t["name"] for t in expected["tensors"]}
    assert diff["shape_changed"], "the tiny fixture's shapes differ from the real manifest's"

    result = _tool(installed, "merge-lora", ft, "--base", base, "-o", work / "merged", "--no-hash-base")
    assert result.returncode == 0, result.stderr
    record = json.loads((work / "merged" / "omgtool-merge.json").read_text())
    assert record["alpha"] == 256 and "mapping" in record["alpha_source"]
    assert (work / "merged" / "config.json").is_file() and list((work / "merged").glob("model*.safetensors"))
