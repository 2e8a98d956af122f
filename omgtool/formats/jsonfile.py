"""The one way omgtool reads a JSON side file (config.json, tokenizer_config.json, ...)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from omgtool.errors import UnreadableInput

MAX_JSON_BYTES = 64 << 20


def _no_constants(name: str):
    raise ValueError(f"{name} is not valid JSON")


def parse_json(raw: bytes | str, what: str, path: Path, *, strict: bool = False) -> Any:
    """Parse `raw`; any failure (bad syntax or UTF-8, deep nesting, integers past Python's digit
    limit, and with `strict` NaN/Infinity) is UnreadableInput naming `what`."""
    try:
        return json.loads(raw, parse_constant=_no_constants if strict else None)
    except RecursionError:
        raise UnreadableInput(f"{what} nests too deeply", path) from None
    except MemoryError:
        raise UnreadableInput(f"{what} is too large to parse", path) from None
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
        raise UnreadableInput(f"{what} is not valid JSON ({str(exc)[:200]})", path) from None


def read_capped(path: Path, cap: int = MAX_JSON_BYTES) -> bytes:
    with open(path, "rb") as fh:
        raw = fh.read(cap + 1)
    if len(raw) > cap:
        raise UnreadableInput(f"{path.name} is larger than {cap} bytes", path.parent)
    return raw


def read_json_object(path: Path, *, missing_ok: bool = False) -> dict[str, Any]:
    """The JSON object in `path`; {} if it is absent and `missing_ok`. Malformed -> exit 2."""
    path = Path(path)
    if missing_ok and not path.is_file():
        return {}
    try:
        raw = read_capped(path)
    except FileNotFoundError:
        raise UnreadableInput(f"{path.name} is missing", path.parent) from None
    except (IsADirectoryError, PermissionError) as exc:
        raise UnreadableInput(f"{path.name}: {exc.strerror}", path.parent) from None
    data = parse_json(raw, path.name, path.parent)
    if not isinstance(data, dict):
        raise UnreadableInput(f"{path.name} is not a JSON object", path.parent)
    return data
