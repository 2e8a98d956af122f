"""Side installs for the client checks: packages put into a folder with `pip install --target`
(no venv, no dependencies resolved), used by a subprocess with the folder first on
PYTHONPATH, so the main venv's torch and numpy are reused and its own versions stay as they are."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from tests.paths import ROOT

#: transformers 4.x, as llama.cpp's convert_hf_to_gguf.py requires it (requirements: 4.57.6).
TRANSFORMERS4 = ROOT / ".venv" / "side-transformers4"
TRANSFORMERS4_PACKAGES = ["transformers==4.57.6", "tokenizers>=0.22,<0.23", "huggingface_hub>=0.34,<1.0",
                          "requests", "urllib3", "idna", "charset_normalizer", "certifi"]


class SideInstallFailed(RuntimeError):
    pass


def side_install(folder: Path, packages: list[str], timeout: int = 300) -> Path:
    """Install `packages` into `folder` once (a stamp records what is there)."""
    stamp = folder / ".installed"
    if stamp.is_file() and stamp.read_text() == " ".join(packages):
        return folder
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps",
           "--target", str(tmp), *packages]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise SideInstallFailed(f"{' '.join(packages)}: not installed into {folder} within {timeout} s") from None
    if proc.returncode != 0:
        last = [ln for ln in proc.stderr.splitlines() if ln.strip() and not ln.startswith("WARNING: Location")]
        raise SideInstallFailed(f"{packages[0]} could not be installed into {folder}: "
                                f"{last[-1] if last else proc.returncode}")
    (tmp / ".installed").write_text(" ".join(packages))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder


def transformers4() -> Path:
    return side_install(TRANSFORMERS4, TRANSFORMERS4_PACKAGES)
