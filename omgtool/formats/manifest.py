"""Shape manifests: `{format_version, tensors[{name, shape, dtype}]}` read as a Checkpoint.

A manifest is what `omgtool inspect PATH --manifest OUT.json` writes, or one of the
expected manifests shipped in `mappings/manifests/`. It holds names, shapes and dtypes
and no values: `read()` refuses. A tensor's `dtype` may be null, meaning "not checked"
(the shipped real-size manifests do this where the real dtypes are not documented).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omgtool.errors import InvalidArgument, UnreadableInput
from omgtool.formats.base import MAX_NDIM, Checkpoint, SafetyReport, TensorInfo
from omgtool.formats.dtypes import ITEMSIZE
from omgtool.formats.jsonfile import parse_json

SUPPORTED_VERSIONS = (1,)
MAX_MANIFEST_BYTES = 100_000_000
MANIFEST_FORMAT = "manifest"


@dataclass(frozen=True)
class ManifestTensor(TensorInfo):
    """A manifest entry: name, shape and (possibly unknown, None) dtype; no bytes anywhere."""

    @property
    def nbytes(self) -> int:
        """Bytes the tensor would take; 0 when the manifest leaves the dtype unchecked."""
        return self.numel * ITEMSIZE[self.dtype] if self.dtype in ITEMSIZE else 0

    @property
    def location(self) -> str:
        return "manifest"


@dataclass
class ManifestCheckpoint(Checkpoint):
    """Names, shapes and dtypes only. `read()` raises: values need a real checkpoint."""

    def read(self, name: str):
        raise InvalidArgument(f"{self.path} is a shape manifest: it holds names, shapes and dtypes, "
                              f"no values (asked for {name})")


def is_manifest(ckpt: Checkpoint) -> bool:
    return isinstance(ckpt, ManifestCheckpoint)


def looks_like_manifest(obj: Any) -> bool:
    return isinstance(obj, dict) and "format_version" in obj and "tensors" in obj


def read_manifest(path: Path) -> ManifestCheckpoint:
    """Parse and validate a manifest file. Raises UnreadableInput with the reason."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_MANIFEST_BYTES:
            raise UnreadableInput(f"JSON file of {size} bytes is too large for a manifest", path)
        obj = parse_json(path.read_bytes(), "JSON file", path)
    except (FileNotFoundError, IsADirectoryError, PermissionError) as exc:
        raise UnreadableInput(exc.strerror or str(exc), path) from None
    return manifest_from_object(obj, path)


def manifest_from_object(obj: Any, path: Path) -> ManifestCheckpoint:
    if not looks_like_manifest(obj):
        hint = " (a sharded checkpoint's index: pass its folder)" if isinstance(obj, dict) and \
            "weight_map" in obj else ""
        raise UnreadableInput("JSON file is not an omgtool manifest (needs 'format_version' and "
                              f"'tensors'){hint}", path)
    version = obj["format_version"]
    if isinstance(version, bool) or not isinstance(version, int):
        raise UnreadableInput(f"manifest format_version must be an integer, got {version!r}", path)
    if version not in SUPPORTED_VERSIONS:
        raise UnreadableInput(f"manifest format_version {version} is not supported (this omgtool "
                              f"reads {', '.join(map(str, SUPPORTED_VERSIONS))})", path)
    entries = obj["tensors"]
    if not isinstance(entries, list):
        raise UnreadableInput("manifest 'tensors' must be a list", path)
    tensors: dict[str, ManifestTensor] = {}
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or not entry["name"]:
            raise UnreadableInput(f"manifest entry {i} has no name", path)
        name = entry["name"]
        if not name.isprintable():
            raise UnreadableInput(f"manifest entry {i}: name {ascii(name)[:80]} holds control characters or "
                                  "lone surrogates (omgtool writes such names escaped)", path)
        shape = entry.get("shape")
        if not (isinstance(shape, list) and len(shape) <= MAX_NDIM
                and all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s < 1 << 63 for s in shape)):
            raise UnreadableInput(f"manifest entry {name}: shape must be a list of non-negative "
                                  f"integers, got {shape!r}", path)
        if "dtype" not in entry:
            raise UnreadableInput(f"manifest entry {name} has no dtype (use null for 'not checked')",
                                  path)
        dtype = entry["dtype"]
        if dtype is not None and (not isinstance(dtype, str) or dtype not in ITEMSIZE):
            raise UnreadableInput(f"manifest entry {name}: unknown dtype {dtype!r} (use a safetensors "
                                  f"name such as F32, BF16, or null)", path)
        if name in tensors:
            raise UnreadableInput(f"manifest lists {name} twice", path)
        numel = math.prod(shape)
        tensors[name] = ManifestTensor(name=name, shape=tuple(shape), dtype=dtype, file=path,
                                       data_offset=0, storage_numel=numel, storage_key="manifest")
    metadata = {k: v for k, v in obj.items() if k != "tensors"}
    return ManifestCheckpoint(path=path, format=MANIFEST_FORMAT, tensors=tensors,
                              safety=SafetyReport(verdict="not-a-pickle"), metadata=metadata,
                              files=[path])
