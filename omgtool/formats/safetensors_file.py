"""safetensors files: header only, validated the way the reference library does.

Everything the reference library (safetensors 0.4+, Rust/serde) rejects is refused here
too, with the reason: non-integer or boolean sizes and offsets, dims past u64, shapes
whose byte size overflows, metadata values that are not strings, lone surrogates in
names, NaN, bytes after the last tensor. Duplicate names are refused as ambiguous.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

from omgtool.errors import UnreadableInput
from omgtool.formats.base import INT64_MAX, Checkpoint, SafetyReport, TensorInfo
from omgtool.formats.dtypes import ITEMSIZE

MAX_HEADER_BYTES = 100_000_000
U64_MAX = (1 << 64) - 1


class _Duplicate(ValueError):
    pass


def _pairs(pairs: list[tuple[str, object]]) -> dict:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise _Duplicate(f"the header names {dup!r} twice")
    return out


def _no_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def _is_u64(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= U64_MAX


_SURROGATE = re.compile("[\ud800-\udfff]")


def _has_surrogate(text: str) -> bool:
    return not text.isprintable() and _SURROGATE.search(text) is not None  # surrogates are not printable


def _bad(message: str, path: Path) -> UnreadableInput:
    return UnreadableInput(f"bad safetensors header: {message}", path)


def _parse(raw: bytes, path: Path) -> dict:
    try:
        header = json.loads(raw, object_pairs_hook=_pairs, parse_constant=_no_constant)
    except _Duplicate as exc:
        raise _bad(str(exc), path) from None
    except RecursionError:
        raise _bad("JSON nests too deeply", path) from None
    except MemoryError:
        raise _bad("header too large to parse", path) from None
    except (UnicodeDecodeError, ValueError) as exc:  # also integers past Python's digit limit
        raise _bad(f"invalid JSON ({str(exc)[:200]})", path) from None
    if not isinstance(header, dict):
        raise _bad("not a JSON object", path)
    return header


def _entry(name: str, entry, path: Path) -> tuple[str, tuple[int, ...], int, int]:
    shown = ascii(name)[:80]
    if _has_surrogate(name):
        raise _bad(f"tensor name {shown} holds a lone surrogate (not valid UTF-8)", path)
    if not isinstance(entry, dict):
        raise _bad(f"entry {shown} is not an object", path)
    try:
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    except KeyError as exc:
        raise _bad(f"entry {shown} has no {exc.args[0]}", path) from None
    if not isinstance(dtype, str) or dtype not in ITEMSIZE:
        raise _bad(f"{shown} has unknown dtype {str(dtype)[:40]!r}", path)
    if not (isinstance(shape, list) and all(_is_u64(s) for s in shape)):
        raise _bad(f"{shown} has a bad shape (needs a list of integers 0..2**64-1)", path)
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_u64(o) for o in offsets)):
        raise _bad(f"{shown} has bad data_offsets (needs two integers 0..2**64-1)", path)
    numel = 1
    for s in shape:  # the reference library multiplies left to right in u64
        numel *= s
        if numel > U64_MAX:
            raise _bad(f"{shown}: shape {shape} overflows", path)
    nbytes = numel * ITEMSIZE[dtype]
    if nbytes > INT64_MAX:
        raise _bad(f"{shown}: shape {shape} of {dtype} overflows int64 bytes", path)
    begin, end = offsets
    if end < begin:
        raise _bad(f"{shown} has bad offsets (end before begin)", path)
    if end - begin != nbytes:
        raise _bad(f"{shown} spans {end - begin} bytes, its shape and dtype need {nbytes}", path)
    return dtype, tuple(shape), begin, end


def read_header(path: Path) -> tuple[dict, dict, int]:
    """(tensor entries as in the JSON, __metadata__, data start offset). Validates everything."""
    entries, metadata, data_start = read_entries(path)
    header = {name: {"dtype": dtype, "shape": list(shape), "data_offsets": [begin, end]}
              for name, (dtype, shape, begin, end) in entries.items()}
    return header, metadata, data_start


def read_entries(path: Path) -> tuple[dict[str, tuple[str, tuple[int, ...], int, int]], dict, int]:
    """(name -> (dtype, shape, begin, end), __metadata__, data start offset). Validates everything."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        raw = fh.read(8)
        if len(raw) != 8:
            raise _bad("file shorter than 8 bytes", path)
        (n,) = struct.unpack("<Q", raw)
        if n > MAX_HEADER_BYTES:
            raise _bad(f"length {n} exceeds the cap of {MAX_HEADER_BYTES}", path)
        if 8 + n > size:
            raise UnreadableInput(f"truncated: expected at least {8 + n} bytes (header of {n}), file has "
                                  f"{size}", path)
        header = _parse(fh.read(n), path)
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _bad("__metadata__ must be an object of strings", path)
    entries = {name: _entry(name, entry, path) for name, entry in header.items()}
    cursor = 0
    for name, (_, _, begin, end) in sorted(entries.items(), key=lambda kv: (kv[1][2], kv[1][3])):
        if begin != cursor:
            raise _bad(f"{ascii(name)[:80]} overlaps or leaves a gap (starts at {begin}, expected {cursor})",
                       path)
        cursor = end
    data_start = 8 + n
    if data_start + cursor > size:
        raise UnreadableInput(f"truncated: expected {data_start + cursor} bytes, file has {size}", path)
    if data_start + cursor < size:
        raise _bad(f"{size - data_start - cursor} bytes after the last tensor (the reference library "
                   "refuses such files)", path)
    return entries, metadata, data_start


def read_safetensors(path: Path) -> Checkpoint:
    entries, metadata, data_start = read_entries(path)
    tensors = {}
    for name, (dtype, shape, begin, end) in entries.items():
        tensors[name] = TensorInfo(name=name, shape=shape, dtype=dtype, file=path,
                                   data_offset=data_start + begin,
                                   storage_numel=(end - begin) // ITEMSIZE[dtype], storage_key=path.name)
    return Checkpoint(path=path, format="safetensors", tensors=tensors,
                      safety=SafetyReport(verdict="not-a-pickle"), metadata=dict(metadata),
                      files=[path])
