"""The one way omgtool reads a JSON side file (config.json, tokenizer_config.json, ...)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from omgtool.errors import UnreadableInput


def read_json_object(path: Path, *, missing_ok: bool = False) -> dict[str, Any]:
    """The JSON object in `path`; {} if it is absent and `missing_ok`. Malformed -> exit 2."""
    path = Path(path)
    if missing_ok and not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UnreadableInput(f"{path.name} is not valid JSON ({exc})", path.parent) from None
    except FileNotFoundError:
        raise UnreadableInput(f"{path.name} is missing", path.parent) from None
    if not isinstance(data, dict):
        raise UnreadableInput(f"{path.name} is not a JSON object", path.parent)
    return data
