"""safetensors files: header only, validated the way the reference library does."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

from omgtool.errors import UnreadableInput
from omgtool.formats.base import Checkpoint, SafetyReport, TensorInfo
from omgtool.formats.dtypes import ITEMSIZE

MAX_HEADER_BYTES = 100_000_000


def read_header(path: Path) -> tuple[dict, dict, int]:
    """(tensor entries, __metadata__, data start offset). Validates everything."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        raw = fh.read(8)
        if len(raw) != 8:
            raise UnreadableInput("bad safetensors header: file shorter than 8 bytes", path)
        (n,) = struct.unpack("<Q", raw)
        if n > MAX_HEADER_BYTES or 8 + n > size:
            raise UnreadableInput(f"bad safetensors header: length {n} exceeds the file or the cap", path)
        try:
            header = json.loads(fh.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise UnreadableInput(f"bad safetensors header: invalid JSON ({exc})", path) from None
    if not isinstance(header, dict):
        raise UnreadableInput("bad safetensors header: not a JSON object", path)
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise UnreadableInput("bad safetensors header: __metadata__ is not an object", path)
    data_start = 8 + n
    spans = []
    for name, entry in header.items():
        try:
            dtype, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise UnreadableInput(f"bad safetensors header: entry {name!r} is malformed", path) from None
        if dtype not in ITEMSIZE:
            raise UnreadableInput(f"bad safetensors header: {name} has unknown dtype {dtype!r}", path)
        if not (isinstance(shape, list) and all(isinstance(s, int) and s >= 0 for s in shape)):
            raise UnreadableInput(f"bad safetensors header: {name} has a bad shape", path)
        if not (isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end):
            raise UnreadableInput(f"bad safetensors header: {name} has bad offsets", path)
        if end - begin != math.prod(shape) * ITEMSIZE[dtype]:
            raise UnreadableInput(f"bad safetensors header: {name} spans {end - begin} bytes, its shape "
                                  f"and dtype need {math.prod(shape) * ITEMSIZE[dtype]}", path)
        spans.append((begin, end, name))
    spans.sort()
    cursor = 0
    for begin, end, name in spans:
        if begin != cursor:
            raise UnreadableInput(f"bad safetensors header: {name} overlaps or leaves a gap", path)
        cursor = end
    if data_start + cursor > size:
        raise UnreadableInput(f"file is truncated: data ends at {data_start + cursor}, file has {size} "
                              f"bytes", path)
    return header, metadata, data_start


def read_safetensors(path: Path) -> Checkpoint:
    header, metadata, data_start = read_header(path)
    tensors = {}
    for name, entry in header.items():
        shape = tuple(entry["shape"])
        begin = entry["data_offsets"][0]
        tensors[name] = TensorInfo(name=name, shape=shape, dtype=entry["dtype"], file=path,
                                   data_offset=data_start + begin, storage_numel=math.prod(shape),
                                   storage_key=path.name)
    return Checkpoint(path=path, format="safetensors", tensors=tensors,
                      safety=SafetyReport(verdict="not-a-pickle"), metadata=dict(metadata),
                      files=[path])
