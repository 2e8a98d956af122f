"""Grade a pickle global as `safe`, `unknown` or `dangerous` (data: mappings/safety/globals.toml).

Nothing is imported: a global is a (module, name) pair of strings, looked up in tables.
"""

from __future__ import annotations

import tomllib
from functools import lru_cache

SAFE, UNKNOWN, DANGEROUS = "safe", "unknown", "dangerous"
GRADE_ORDER = {SAFE: 0, UNKNOWN: 1, DANGEROUS: 2}
# Dunder names that are plain object construction, not attribute traversal.
_CONSTRUCTION_DUNDERS = {"__newobj__"}


def worst(grades) -> str:
    return max(grades, key=GRADE_ORDER.__getitem__, default=SAFE)


def compat_name(module: str, name: str) -> tuple[str, str]:
    """Python 2 names as the unpickler's fix_imports maps them (`__builtin__.set` -> `builtins.set`)."""
    import _compat_pickle  # a table of names, part of the standard library

    if (module, name) in _compat_pickle.NAME_MAPPING:
        return _compat_pickle.NAME_MAPPING[(module, name)]
    return _compat_pickle.IMPORT_MAPPING.get(module, module), name


@lru_cache(maxsize=1)
def _tables() -> dict:
    from omgtool.mappings_dir import mappings_dir
    from omgtool.errors import InvalidArgument
    from omgtool.formats.dtypes import STORAGE_DTYPES, TORCH_DTYPE_NAMES

    path = mappings_dir() / "safety" / "globals.toml"
    try:
        data = tomllib.loads(path.read_text())
        safe = {(module, name) for module, names in data["safe"].items() for name in names}
        dangerous = data["dangerous"]
        tables = {
            "safe": safe,
            "dangerous_modules": set(dangerous["modules"]),
            "dangerous_names": set(dangerous["names"]),
            "dangerous_why": dict(dangerous.get("why", {})),
            "unknown_why": dict(data.get("unknown", {}).get("why", {})),
        }
    except (OSError, KeyError, TypeError, tomllib.TOMLDecodeError) as exc:
        raise InvalidArgument(f"{path}: invalid safety mapping ({type(exc).__name__}: {exc})") from None
    for storage in STORAGE_DTYPES:
        safe.add(("torch", storage))
    for dtype in TORCH_DTYPE_NAMES:
        safe.add(("torch", dtype))
    return tables


def _longest_prefix(full: str, table: dict[str, str]) -> str | None:
    parts = full.split(".")
    for n in range(len(parts), 0, -1):
        hit = table.get(".".join(parts[:n]))
        if hit is not None:
            return hit
    return None


def is_safe(module: str, name: str) -> bool:
    return compat_name(module, name) in _tables()["safe"]


def grade_global(module: str, name: str) -> tuple[str, str]:
    """(grade, why) for one global."""
    tables = _tables()
    module, name = compat_name(module, name)
    full = f"{module}.{name}"
    if (module, name) in tables["safe"]:
        return SAFE, "allowlisted"
    parts = module.split(".")
    prefixes = {".".join(parts[:n]) for n in range(1, len(parts) + 1)}
    if full in tables["dangerous_names"] or prefixes & tables["dangerous_modules"]:
        why = _longest_prefix(full, tables["dangerous_why"]) or "on the denylist (runs code or touches the system)"
        return DANGEROUS, why
    if "." in name:
        return DANGEROUS, "dotted name: reaches an attribute of the object, not a plain global"
    if name.startswith("__") and name.endswith("__") and name not in _CONSTRUCTION_DUNDERS:
        return DANGEROUS, "dunder attribute: reaches interpreter internals"
    why = _longest_prefix(full, tables["unknown_why"])
    return UNKNOWN, (why + "; " if why else "") + "not in the allowlist: a real load imports and runs it"
