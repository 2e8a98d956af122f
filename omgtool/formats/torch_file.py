"""`torch.save` files, zip and legacy, read by walking their pickles (never loading them)."""

from __future__ import annotations

import io
import struct
from pathlib import Path
from typing import Any

from omgtool.errors import UnreadableInput
from omgtool.formats.base import Checkpoint, SafetyReport, TensorInfo, check_extents
from omgtool.formats.containers import TooDeep, find_tensors, walk_tensors
from omgtool.formats.dtypes import ITEMSIZE
from omgtool.formats.pickle_walker import MalformedPickle, StorageRef, TensorRef, WalkResult, walk

MAX_PICKLE_BYTES = 1 << 30
# torch writes every member STORED; a compressed pickle member is inflated at most this far
# (a few KB of deflate can claim gigabytes).
MAX_INFLATED_PICKLE_BYTES = 64 << 20
MAX_SMALL_MEMBER_BYTES = 1 << 10  # byteorder, version
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001
_LOCAL_HEADER = struct.Struct("<4s5H3I2H")  # 30 bytes


def read_torch_zip(path: Path, main_walk: tuple[str, WalkResult] | None = None) -> Checkpoint:
    """Read the archive as torch's PyTorchFileReader does (zip_reader). Safety is decided by
    formats/scan.py before this runs; here the main pickle is walked for its tensors only
    (`main_walk`: the scanner's walk of the same member, (name, result), taken as it is)."""
    import mmap

    from omgtool.formats.zip_reader import ZipError, read_zip

    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as data:
        size = len(data)
        try:
            archive = read_zip(data)
            names = [m.name for m in archive.members]
            main = None
            if any(n.lower() == "data.pkl" or n.lower().endswith("/data.pkl") for n in names):
                prefix = archive.prefix
                main = archive.locate(prefix + "data.pkl")
            if main is None:
                if "model.weights.h5" in names:
                    what = "a Keras .keras archive"
                elif any(n.endswith(".npy") for n in names):
                    what = "a NumPy .npz archive"
                else:
                    what = "a zip archive without data.pkl"
                raise UnreadableInput(f"not a checkpoint: looks like {what} (not a torch checkpoint)", path)
            byteorder = archive.locate(prefix + "byteorder")
            if byteorder is not None:
                order = archive.read(byteorder, MAX_SMALL_MEMBER_BYTES).strip()
                if order != b"little":
                    raise UnreadableInput("big-endian checkpoints are not supported" if order == b"big" else
                                          f"{byteorder.name} says {order[:20]!r}, not little or big", path)
            if main_walk is not None and main_walk[0] == main.name:
                walked = main_walk[1]
            else:
                limit = MAX_PICKLE_BYTES if main.is_stored else MAX_INFLATED_PICKLE_BYTES
                walked = _walk(archive.read(main, limit), main.name, path)
        except ZipError as exc:
            raise UnreadableInput(zip_truncation(path) or f"corrupt zip archive ({exc})", path) from None
        safety = SafetyReport(globals_seen=sorted(walked.globals_seen))

        def locate(ref: StorageRef) -> tuple[int, int, str]:
            name = f"{prefix}data/{ref.key}"
            if ref.extra:
                raise UnreadableInput(f"storage {ref.key}: a persistent id of {5 + len(ref.extra)} "
                                      "fields (torch's zip loader takes 5)", path)
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
            if info.header_offset + _LOCAL_HEADER.size > size:
                raise UnreadableInput(truncated(info.header_offset + _LOCAL_HEADER.size, size), path)
            fields = _LOCAL_HEADER.unpack_from(data, info.header_offset)
            start = info.header_offset + _LOCAL_HEADER.size
            if bytes(data[start:start + fields[9]]) not in (name.encode("utf-8"), name.encode("cp437", "replace")):
                raise UnreadableInput(f"the local header of {name} names another file than the central "
                                      "directory", path)
            try:
                return archive.data_offset(info), ref.numel, name
            except ZipError as exc:
                raise UnreadableInput(str(exc), path) from None

        tensors, groups, container, meta = _collect(walked.value, locate, path)
    for t in tensors.values():
        end = t.data_offset + t.storage_numel * ITEMSIZE[t.dtype]
        if end > size:
            raise UnreadableInput(truncated(end, size, f"tensor {t.name} lies past the end"), path)
    check_extents(path, tensors)
    return Checkpoint(path=path, format="torch-zip", tensors=tensors, safety=safety,
                      container=container, metadata=meta, files=[path], groups=groups)


def truncated(expected: int, size: int, what: str = "", at_least: bool = False) -> str:
    bound = "at least " if at_least else ""
    return f"truncated: expected {bound}{expected} bytes, file has {size}" + (f" ({what})" if what else "")


def zip_truncation(path: Path) -> str | None:
    """Why a zip that starts with a local header has no readable central directory, when the
    reason is that the file was cut short; None when it is corrupt some other way.

    Follows the local headers (torch writes sizes in data descriptors after each member); once
    data.pkl is complete, its storage sizes say how large the file must at least be."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        data = fh.read(min(size, MAX_PICKLE_BYTES))
    if len(data) < size:
        return None
    end_record = data.rfind(b"PK\x05\x06", max(0, size - (1 << 16) - 22))
    if end_record >= 0 and end_record + 22 <= size:
        return None  # the end of the central directory is there: corrupt, not cut short
    pos, done = 0, {}
    while True:
        sig = data[pos:pos + 4]
        if sig == b"PK\x01\x02":
            return _central_directory_truncation(data, pos)
        if pos >= size:
            return truncated(size + 22, size, "the central directory is missing", at_least=True)
        if sig != b"PK\x03\x04":
            return None
        if pos + _LOCAL_HEADER.size > size:
            return truncated(pos + _LOCAL_HEADER.size, size, "cut inside a local header", at_least=True)
        fields = _LOCAL_HEADER.unpack_from(data, pos)
        flags, method, compressed, name_len, extra_len = fields[2], fields[3], fields[6], fields[9], fields[10]
        try:
            name = data[pos + 30:pos + 30 + name_len].decode("utf-8")
        except UnicodeDecodeError:
            return None
        if method not in (0, 8) or not name.isprintable():
            return None  # not a plausible local header: corrupt, not cut short
        start = pos + _LOCAL_HEADER.size + name_len + extra_len
        if flags & 0x08:  # sizes follow the data, in a descriptor
            desc = data.find(b"PK\x07\x08", start)
            if desc < 0:
                sizes = _storage_sizes(done, data)
                need = start + sizes.get(name, 0)
                rest = _still_to_come(name, done, sizes)
                return truncated(max(need, size + 1) + rest, size, f"the file ends inside member {name}",
                                 at_least=True)
            zip64 = desc + 24 <= size and int.from_bytes(data[desc + 8:desc + 16], "little") == desc - start
            end, pos = desc, desc + (24 if zip64 else 16)
        else:
            if compressed == 0xFFFFFFFF:
                compressed = _zip64_size(data[start - extra_len:start])
                if compressed is None:
                    return None
            end = pos = start + compressed
            if end > size:
                return truncated(end + _still_to_come(name, done, _storage_sizes(done, data)), size,
                                 f"member {name} ends past the end of the file", at_least=True)
        done[name] = (start, end)


def _central_directory_truncation(data: bytes, pos: int) -> str | None:
    size = len(data)
    why = "the central directory is cut short"
    while data[pos:pos + 4] == b"PK\x01\x02":
        if pos + 46 > size:
            return truncated(pos + 46, size, why, at_least=True)
        pos += 46 + sum(struct.unpack_from("<3H", data, pos + 28))
    if data[pos:pos + 4] == b"PK\x06\x06" and pos + 12 <= size:  # zip64 end record, then its locator
        pos += 12 + int.from_bytes(data[pos + 4:pos + 12], "little") + 20
    tail = data[pos:pos + 4]
    if pos + 22 > size and b"PK\x05\x06".startswith(tail):
        return truncated(pos + 22, size, why, at_least=True)
    return None  # the central directory is all there: corrupt, not truncated


def _storage_sizes(done: dict, data: bytes) -> dict[str, int]:
    """Storage member name -> bytes, from a complete (STORED) data.pkl; {} when there is none."""
    pkl = next((n for n in done if n.endswith("data.pkl")), None)
    if pkl is None:
        return {}
    start, end = done[pkl]
    try:
        result = walk(io.BytesIO(data[start:end]), member=pkl)
        refs = walk_tensors(result.value)[0] if not result.findings else []
    except Exception:  # only an estimate: the real read reports what is wrong with the pickle
        return {}
    prefix = pkl[: -len("data.pkl")]
    return {f"{prefix}data/{r.storage.key}": r.storage.numel * ITEMSIZE.get(r.storage.dtype, 1)
            for _, r in refs}


def _still_to_come(name: str, done: dict, sizes: dict[str, int]) -> int:
    """Bytes of the storages after member `name` that the file never reached."""
    return sum(n for member, n in sizes.items() if member not in done and member != name)


def _zip64_size(extra: bytes) -> int | None:
    i = 0
    while i + 4 <= len(extra):
        tag, length = struct.unpack_from("<HH", extra, i)
        if tag == 1 and length >= 16:
            return struct.unpack_from("<Q", extra, i + 12)[0]
        i += 4 + length
    return None


def read_torch_legacy(path: Path) -> Checkpoint:
    """Pre-1.6 format: magic, protocol, sys_info, data pickle, storage keys, raw storages."""
    safety = SafetyReport()
    size = path.stat().st_size
    with open(path, "rb") as fh:
        results = []
        for label in ("magic", "protocol", "sys_info", "data", "storage_keys"):
            start = fh.tell()
            try:
                result = walk(fh, member=label)
            except MalformedPickle as exc:
                cut = "truncated" in str(exc) or fh.tell() >= size
                reason = "truncated: the file ends inside" if cut else "not a torch checkpoint or corrupt:"
                raise UnreadableInput(f"{reason} the {label} pickle at byte {start} ({exc}); file has "
                                      f"{size} bytes", path) from None
            except _WALK_FAILURES as exc:
                raise UnreadableInput(_walk_failure(label, exc), path) from None
            safety.globals_seen = sorted(set(safety.globals_seen) | result.globals_seen)
            results.append(result)
            if label == "magic" and result.value != LEGACY_MAGIC:
                raise UnreadableInput("not a torch checkpoint (no zip header, no legacy magic number)",
                                      path)
            if label == "protocol" and (type(result.value) is not int or result.value != LEGACY_PROTOCOL):
                raise UnreadableInput(f"legacy protocol version {str(result.value)[:20]} (torch reads only "
                                      f"{LEGACY_PROTOCOL})", path)
        sys_info = results[2].value
        if isinstance(sys_info, dict) and sys_info.get("little_endian") is False:
            raise UnreadableInput("big-endian checkpoints are not supported", path)
        keys = results[4].value
        if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
            raise UnreadableInput("legacy checkpoint has no storage key list", path)
        # Storages follow in key order, each as <int64 numel><raw bytes>.
        refs = _storage_refs(results[3].value, path)
        offsets: dict[str, int] = {}
        pos = fh.tell()
        for i, key in enumerate(keys):
            ref = refs.get(key)
            if ref is None:
                raise UnreadableInput(f"storage {key} is listed but not referenced", path)
            fh.seek(pos)
            raw = fh.read(8)
            if len(raw) != 8:
                raise UnreadableInput(truncated(_legacy_end(pos, keys[i:], refs), size,
                                                f"in storage {key}"), path)
            (numel,) = struct.unpack("<q", raw)
            if numel != ref.numel:
                raise UnreadableInput(f"storage {key} holds {numel} elements, metadata says {ref.numel}",
                                      path)
            offsets[key] = pos + 8
            pos += 8 + numel * ITEMSIZE[ref.dtype]
            if pos > size:
                raise UnreadableInput(truncated(_legacy_end(pos, keys[i + 1:], refs), size,
                                                f"in storage {key}"), path)

    views: dict[str, tuple[int, int]] = {}

    def locate(ref: StorageRef) -> tuple[int, int, str]:
        if ref.key not in offsets:
            raise UnreadableInput(f"storage {ref.key} is missing", path)
        view = _legacy_view(ref, path)
        if view is None:
            return offsets[ref.key], ref.numel, f"storage {ref.key}"
        view_key, first, numel = view
        if views.setdefault(view_key, (first, numel)) != (first, numel):
            raise UnreadableInput(f"storage view {view_key} is defined twice, differently", path)
        return offsets[ref.key] + first * ITEMSIZE[ref.dtype], numel, f"storage {ref.key}[{view_key}]"

    tensors, groups, container, meta = _collect(results[3].value, locate, path)
    check_extents(path, tensors)
    return Checkpoint(path=path, format="torch-legacy", tensors=tensors, safety=safety,
                      container=container, metadata=meta, files=[path], groups=groups)


def _legacy_end(pos: int, rest: list[str], refs: dict[str, StorageRef]) -> int:
    """Where the file should end: `pos` plus every storage still to come."""
    return pos + sum(8 + refs[k].numel * ITEMSIZE[refs[k].dtype] for k in rest if k in refs)


def _legacy_view(ref: StorageRef, path: Path) -> tuple[str, int, int] | None:
    """(view key, offset, numel) when the legacy format saved this storage as a slice of a larger
    one (`view_metadata`): torch reads the tensor from that slice, not from the root storage."""
    if len(ref.extra) != 1:
        raise UnreadableInput(f"storage {ref.key}: a persistent id of {5 + len(ref.extra)} fields (torch's "
                              "legacy loader takes 6)", path)
    view = ref.extra[0]
    if view is None:
        return None
    if not (isinstance(view, tuple) and len(view) == 3 and isinstance(view[0], str)
            and all(type(v) is int for v in view[1:])):
        raise UnreadableInput(f"storage {ref.key}: malformed view metadata", path)
    _, first, numel = view
    if first < 0 or numel < 0 or first + numel > ref.numel:
        raise UnreadableInput(f"storage {ref.key}: view [{first}, {first + numel}) lies outside its "
                              f"{ref.numel} elements", path)
    return view


_WALK_FAILURES = (RecursionError, MemoryError, OverflowError, UnicodeError, ValueError, TypeError)


def _walk_failure(member: str, exc: BaseException) -> str:
    kind = {RecursionError: "nesting too deep", MemoryError: "exhausts memory",
            OverflowError: "a number out of range"}.get(type(exc), type(exc).__name__)
    return f"{member}: malformed pickle ({kind})"


def _walk(raw: bytes, member: str, path: Path) -> WalkResult:
    try:
        return walk(io.BytesIO(raw), member=member)
    except MalformedPickle as exc:
        raise UnreadableInput(f"{member}: {exc}", path) from None
    except _WALK_FAILURES as exc:
        raise UnreadableInput(_walk_failure(member, exc), path) from None


def _tensor_refs(value: Any, path: Path) -> list[tuple[tuple[str, ...], TensorRef]]:
    try:
        return walk_tensors(value)[0]
    except TooDeep as exc:
        raise UnreadableInput(str(exc), path) from None


def _storage_refs(value: Any, path: Path) -> dict[str, StorageRef]:
    """Storage key -> the first reference to it (torch keeps the first one's dtype and size)."""
    found: dict[str, StorageRef] = {}
    for _, ref in _tensor_refs(value, path):
        found.setdefault(ref.storage.key, ref.storage)
    return found


def _collect(value: Any, locate, path: Path):
    """(tensors, groups of tensors outside the model's dict, container path, metadata)."""
    try:
        layout = find_tensors(value)
    except TooDeep as exc:
        raise UnreadableInput(str(exc), path) from None
    first: dict[str, StorageRef] = {}
    tensors: dict[str, TensorInfo] = {}
    for name, item in layout.tensors.items():
        storage = item.storage
        seen = first.setdefault(storage.key, storage)
        if (seen.dtype, seen.numel) != (storage.dtype, storage.numel):
            raise UnreadableInput(f"storage {storage.key} is referenced as {seen.numel} x {seen.dtype} and "
                                  f"as {storage.numel} x {storage.dtype} (torch would use the first)", path)
        offset, numel, key = locate(storage)
        tensors[name] = TensorInfo(
            name=name, shape=item.shape, dtype=storage.dtype, file=path, data_offset=offset,
            storage_numel=numel, storage_offset=item.storage_offset, stride=item.stride, storage_key=key)
    return tensors, layout.groups, layout.container, layout.metadata
