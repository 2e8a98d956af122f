"""Validated mappings, cached: pydantic validates each set of `mappings/*.toml` once; a later run
over byte-identical files rebuilds the very same schema objects (plain frozen dataclasses, see
omgtool.arch.mapping) from a JSON dump, so a start-up imports no pydantic at all.

The cache key is the sha256 of every file's name and bytes plus the omgtool version and this
format's number: editing any mapping, or upgrading omgtool, validates again. The cache lives in
$OMGTOOL_CACHE_DIR, else $XDG_CACHE_HOME/omgtool, else ~/.cache/omgtool; OMGTOOL_CACHE_DIR=""
turns it off. An unreadable or unwritable cache is ignored (the mappings are then validated).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Sequence

FORMAT = 2
_CLASS = "@schema"  # the key naming a dumped object's class


def cache_dir() -> Path | None:
    env = os.environ.get("OMGTOOL_CACHE_DIR")
    if env is not None:
        return Path(env) if env else None
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "omgtool"


def _key(files: Sequence[tuple[Path, bytes]]) -> str:
    from omgtool import __version__

    h = hashlib.sha256(f"{FORMAT}\0{__version__}\0".encode())
    for path, raw in files:
        h.update(path.name.encode() + b"\0" + len(raw).to_bytes(8, "little") + raw)
    return h.hexdigest()


def load(files: Sequence[tuple[Path, bytes]], schemas: dict[str, type]) -> list | None:
    """The objects for `files` (same order) from the cache, or None on a miss. Each is built by
    its class's own constructor (so its __post_init__ checks run again), inner objects first."""

    def build(obj: dict) -> Any:
        name = obj.pop(_CLASS, None)
        return obj if name is None else schemas[name](**obj)

    folder = cache_dir()
    if folder is None:
        return None
    try:
        text = (folder / f"mappings-{_key(files)}.json").read_text(encoding="utf-8")
        objects = json.loads(text, object_hook=build)
        if not isinstance(objects, list) or len(objects) != len(files):
            return None
        return objects
    except (OSError, ValueError, KeyError, TypeError):
        return None


def dump(obj: Any) -> Any:
    """A schema object as JSON data, each dataclass tagged with its class name."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {_CLASS: type(obj).__name__, **{f.name: dump(getattr(obj, f.name)) for f in dataclasses.fields(obj)}}
    if isinstance(obj, dict):
        return {k: dump(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [dump(v) for v in obj]
    return obj


def store(files: Sequence[tuple[Path, bytes]], objects: Sequence[Any]) -> None:
    folder = cache_dir()
    if folder is None:
        return
    try:
        folder.mkdir(parents=True, exist_ok=True)
        text = json.dumps([dump(m) for m in objects])
        fd, tmp = tempfile.mkstemp(prefix=".mappings-", dir=folder)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, folder / f"mappings-{_key(files)}.json")
    except OSError:
        pass
