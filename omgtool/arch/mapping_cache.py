"""Validated mappings, cached: pydantic validates each set of `mappings/*.toml` once; a later run
over byte-identical files rebuilds the very same models with `model_construct`, so no pydantic
core schema is built at start-up (the largest part of loading the mappings).

The cache key is the sha256 of every file's name and bytes plus the omgtool and pydantic
versions: editing any mapping, or upgrading either package, validates again. The cache lives in
$OMGTOOL_CACHE_DIR, else $XDG_CACHE_HOME/omgtool, else ~/.cache/omgtool; OMGTOOL_CACHE_DIR=""
turns it off. An unreadable or unwritable cache is ignored (the mappings are then validated).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import types
from pathlib import Path
from typing import Any, Sequence, Union, get_args, get_origin

FORMAT = 1


def cache_dir() -> Path | None:
    env = os.environ.get("OMGTOOL_CACHE_DIR")
    if env is not None:
        return Path(env) if env else None
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "omgtool"


def _key(files: Sequence[tuple[Path, bytes]]) -> str:
    import pydantic

    from omgtool import __version__

    h = hashlib.sha256(f"{FORMAT}\0{__version__}\0{pydantic.VERSION}\0".encode())
    for path, raw in files:
        h.update(path.name.encode() + b"\0" + len(raw).to_bytes(8, "little") + raw)
    return h.hexdigest()


def load(files: Sequence[tuple[Path, bytes]], kinds: dict[str, type]) -> list | None:
    """The models for `files` (same order) from the cache, or None on a miss."""
    folder = cache_dir()
    if folder is None:
        return None
    try:
        entries = json.loads((folder / f"mappings-{_key(files)}.json").read_text(encoding="utf-8"))
        if len(entries) != len(files):
            return None
        return [construct(kinds[kind], data) for kind, data in entries]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def store(files: Sequence[tuple[Path, bytes]], models: Sequence[Any]) -> None:
    folder = cache_dir()
    if folder is None:
        return
    try:
        folder.mkdir(parents=True, exist_ok=True)
        text = json.dumps([(m.kind, m.model_dump(mode="json")) for m in models])
        fd, tmp = tempfile.mkstemp(prefix=".mappings-", dir=folder)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, folder / f"mappings-{_key(files)}.json")
    except OSError:
        pass


def construct(cls, data: dict) -> Any:
    """`cls` built from an already validated dump, nested models included, without validation."""
    fields = cls.model_fields
    return cls.model_construct(**{name: _value(fields[name].annotation, v) for name, v in data.items()
                                  if name in fields})


def _is_model(tp) -> bool:
    return isinstance(tp, type) and hasattr(tp, "model_construct")


def _value(tp, v):
    if _is_model(tp):
        return construct(tp, v) if isinstance(v, dict) else v
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        for arg in get_args(tp):
            if (_is_model(arg) and isinstance(v, dict)) or (get_origin(arg) in (list, dict) and
                                                            isinstance(v, get_origin(arg))):
                return _value(arg, v)
        return v
    if origin is list and isinstance(v, list):
        (arg,) = get_args(tp)
        return [_value(arg, x) for x in v]
    if origin is dict and isinstance(v, dict):
        _, arg = get_args(tp)
        return {k: _value(arg, x) for k, x in v.items()}
    return v
