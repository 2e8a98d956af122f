"""Byte sizes: parse HF-style sizes, print them, measure files and folders."""

from __future__ import annotations

import re
from pathlib import Path

from omgtool.errors import InvalidArgument

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*$", re.IGNORECASE)
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str | int) -> int:
    """HF-style sizes: '5GB' = 5*10^9, '200MB', '200KB', '1GiB' = 2^30; plain ints are bytes."""
    if isinstance(text, int):
        return text
    m = _SIZE.match(str(text))
    if not m:
        raise InvalidArgument(f"cannot read size {text!r}; use e.g. 5GB, 200MB, 200KB")
    value = float(m.group(1)) * _UNITS[(m.group(2) or "B").upper()]
    if value < 1:
        raise InvalidArgument(f"size {text!r} is too small")
    return int(value)


def format_size(n: int | float | None) -> str:
    """'3.81 MB', '758 B'; decimal units as HF uses them; None prints as a dash."""
    if n is None:
        return "—"
    for unit, div in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n:.0f} B"


def size_on_disk(path: Path) -> int:
    """Bytes of a file, or of every file below a folder."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
