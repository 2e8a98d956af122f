"""`torch.save` files, zip and legacy, read by walking their pickles (never loading them)."""

from __future__ import annotations

import io
import struct
from pathlib import Path
from typing import Any

from omgtool.errors import UnreadableInput
from omgtool.formats.base import Checkpoint, SafetyReport, TensorInfo, check_extents
from omgtool.formats.dtypes import ITEMSIZE
from omgtool.formats.pickle_walker import MalformedPickle, StorageRef, TensorRef, WalkResult, walk

MAX_PICKLE_BYTES = 1 << 30
WRAPPER_KEYS = ("state_dict", "module", "model")
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


def is_zip(path: Path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(4) == b"PK\x03\x04"


def read_torch_zip(path: Path) -> Checkpoint:
    """Read the archive as torch's PyTorchFileReader does (zip_reader). Safety is decided by
    formats/scan.py before this runs; here the main pickle is walked for its tensors only."""
    import mmap

    from omgtool.formats.zip_reader import ZipError, read_zip

    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as data:
        try:
            archive = read_zip(data)
            prefix = archive.prefix
            main = archive.locate(prefix + "data.pkl")
            if main is None:
                raise UnreadableInput("zip archive has no data.pkl (not a torch checkpoint)", path)
            byteorder = archive.locate(prefix + "byteorder")
            if byteorder is not None and archive.read(byteorder, 64).strip() != b"little":
                raise UnreadableInput("big-endian checkpoints are not supported", path)
            walked = _walk(archive.read(main, MAX_PICKLE_BYTES), main.name, path)
        except ZipError as exc:
            raise UnreadableInput(f"corrupt zip archive ({exc})", path) from None
        safety = SafetyReport(globals_seen=sorted(walked.globals_seen))

        def locate(ref: StorageRef) -> tuple[int, str]:
            name = f"{prefix}data/{ref.key}"
            info = archive.locate(name)
            if info is None:
                raise UnreadableInput(f"storage member {name} is missing", path)
            if not info.is_stored:
                raise UnreadableInput(f"storage member {name} is compressed", path)
            expected = ref.numel * ITEMSIZE[ref.dtype]
            if info.size != expected:
                raise UnreadableInput(
                    f"storage member {name} holds {info.size} bytes, its tensor metadata "
                    f"says {expected}", path)
            try:
                return archive.data_offset(info), name
            except ZipError as exc:
                raise UnreadableInput(str(exc), path) from None

        tensors, container, meta = _collect(walked.value, locate, path)
        size = len(data)
    for t in tensors.values():
        if t.data_offset + t.storage_numel * ITEMSIZE[t.dtype] > size:
            raise UnreadableInput(f"file is truncated: tensor {t.name} lies past its end", path)
    check_extents(path, tensors)
    return Checkpoint(path=path, format="torch-zip", tensors=tensors, safety=safety,
                      container=container, metadata=meta, files=[path])


def read_torch_legacy(path: Path) -> Checkpoint:
    """Pre-1.6 format: magic, protocol, sys_info, data pickle, storage keys, raw storages."""
    safety = SafetyReport()
    with open(path, "rb") as fh:
        results = []
        for label in ("magic", "protocol", "sys_info", "data", "storage_keys"):
            start = fh.tell()
            try:
                result = walk(fh, member=label)
            except MalformedPickle as exc:
                raise UnreadableInput(f"not a torch checkpoint or truncated ({label} pickle at "
                                      f"{start}: {exc})", path) from None
            safety.globals_seen = sorted(set(safety.globals_seen) | result.globals_seen)
            results.append(result)
            if label == "magic" and result.value != LEGACY_MAGIC:
                raise UnreadableInput("not a torch checkpoint (no zip header, no legacy magic number)",
                                      path)
        sys_info = results[2].value
        if isinstance(sys_info, dict) and sys_info.get("little_endian") is False:
            raise UnreadableInput("big-endian checkpoints are not supported", path)
        keys = results[4].value
        if not isinstance(keys, list):
            raise UnreadableInput("legacy checkpoint has no storage key list", path)
        # Storages follow in key order, each as <int64 numel><raw bytes>.
        refs = _storage_refs(results[3].value)
        offsets: dict[str, int] = {}
        pos = fh.tell()
        size = path.stat().st_size
        for key in keys:
            fh.seek(pos)
            raw = fh.read(8)
            if len(raw) != 8:
                raise UnreadableInput(f"file is truncated in storage {key}", path)
            (numel,) = struct.unpack("<q", raw)
            ref = refs.get(str(key))
            if ref is None:
                raise UnreadableInput(f"storage {key} is listed but not referenced", path)
            if numel != ref.numel:
                raise UnreadableInput(f"storage {key} holds {numel} elements, metadata says {ref.numel}",
                                      path)
            offsets[str(key)] = pos + 8
            pos += 8 + numel * ITEMSIZE[ref.dtype]
            if pos > size:
                raise UnreadableInput(f"file is truncated in storage {key}", path)

    def locate(ref: StorageRef) -> tuple[int, str]:
        if ref.key not in offsets:
            raise UnreadableInput(f"storage {ref.key} is missing", path)
        return offsets[ref.key], f"storage {ref.key}"

    tensors, container, meta = _collect(results[3].value, locate, path)
    check_extents(path, tensors)
    return Checkpoint(path=path, format="torch-legacy", tensors=tensors, safety=safety,
                      container=container, metadata=meta, files=[path])


def _walk(raw: bytes, member: str, path: Path) -> WalkResult:
    try:
        return walk(io.BytesIO(raw), member=member)
    except MalformedPickle as exc:
        raise UnreadableInput(f"{member}: {exc}", path) from None


def _storage_refs(value: Any) -> dict[str, StorageRef]:
    found: dict[str, StorageRef] = {}

    def visit(obj: Any) -> None:
        if isinstance(obj, TensorRef):
            found[obj.storage.key] = obj.storage
        elif isinstance(obj, dict):
            for v in obj.values():
                visit(v)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                visit(v)

    visit(value)
    return found


def unwrap_state_dict(value: Any) -> tuple[dict, str | None, dict]:
    """Find the tensor dict: the top level, or under a wrapper key such as 'module'."""
    if not isinstance(value, dict):
        raise TypeError(f"top-level object is a {type(value).__name__}, not a dict")
    for key in WRAPPER_KEYS:
        inner = value.get(key)
        if isinstance(inner, dict) and any(isinstance(v, TensorRef) for v in inner.values()):
            meta = {k: v for k, v in value.items() if k != key}
            return inner, key, meta
    return value, None, {}


def _collect(value: Any, locate, path: Path) -> tuple[dict[str, TensorInfo], str | None, dict]:
    try:
        state, container, wrapper_meta = unwrap_state_dict(value)
    except TypeError as exc:
        raise UnreadableInput(str(exc), path) from None
    tensors: dict[str, TensorInfo] = {}
    meta: dict[str, Any] = {k: _summarize(v) for k, v in wrapper_meta.items()}
    for name, item in state.items():
        if isinstance(item, TensorRef):
            offset, key = locate(item.storage)
            tensors[str(name)] = TensorInfo(
                name=str(name), shape=item.shape, dtype=item.storage.dtype, file=path,
                data_offset=offset, storage_numel=item.storage.numel,
                storage_offset=item.storage_offset, stride=item.stride, storage_key=key)
        else:
            meta[str(name)] = _summarize(item)
    return tensors, container, meta


def _summarize(value: Any) -> Any:
    """JSON-friendly view of non-tensor entries (configs, step counters)."""
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, dict):
        return {str(k): _summarize(v) for k, v in list(value.items())[:200]}
    if isinstance(value, (list, tuple)):
        return [_summarize(v) for v in value[:200]]
    if isinstance(value, TensorRef):
        return f"<tensor {list(value.shape)} {value.storage.dtype}>"
    return repr(value)[:200]
