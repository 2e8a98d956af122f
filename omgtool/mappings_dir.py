"""Where the mapping data (mappings/*.toml, mappings/safety/, mappings/manifests/) is read from."""

from __future__ import annotations

import os
from pathlib import Path

from omgtool.errors import InvalidArgument


def mappings_dir() -> Path:
    """OMGTOOL_MAPPINGS if set; else the copy shipped inside the installed package; else the
    repository's top-level mappings/ (a source checkout or an editable install)."""
    env = os.environ.get("OMGTOOL_MAPPINGS")
    if env:
        if not Path(env).is_dir():
            raise InvalidArgument(f"OMGTOOL_MAPPINGS={env} is not a folder")
        return Path(env)
    package = Path(__file__).resolve().parent
    for candidate in (package / "mappings", package.parent / "mappings"):
        if candidate.is_dir() and any(candidate.glob("*.toml")):
            return candidate
    raise InvalidArgument(f"mappings folder not found: neither {package / 'mappings'} (installed package) nor "
                          f"{package.parent / 'mappings'} (source checkout) exists; set OMGTOOL_MAPPINGS=DIR")
