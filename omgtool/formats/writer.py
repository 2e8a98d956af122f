"""Writers: planned, sharded safetensors written as tensors arrive, inside an atomic folder,
and the one JSON file writer.

The plan (every output name, shape, dtype: omgtool.plan.model.PlannedTensor, or anything
with name/shape/dtype/nbytes) is fixed before the first byte is written, so headers can be
written up front and each tensor streamed to disk as soon as it is computed: memory holds
one tensor, never a shard. Nothing appears at the final path until everything succeeded
(`output_dir.atomic_output_dir`). omgtool.plan.execute drives all of it.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

from omgtool.errors import InvalidArgument, OmgError
# The atomic output folder lives in output_dir.py; re-exported for existing callers.
from omgtool.formats.output_dir import atomic_output_dir, check_free_space  # noqa: F401

DEFAULT_MAX_SHARD = "5GB"


def shard_plan(plan: list, max_shard_bytes: int) -> list[list]:
    """Split in order; a tensor larger than the limit gets a shard of its own (as HF does)."""
    shards: list[list] = [[]]
    size = 0
    for t in plan:
        if shards[-1] and size + t.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return [s for s in shards if s] or [[]]


def _header_bytes(tensors: list, metadata: dict[str, str] | None) -> bytes:
    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for t in tensors:
        header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


class ShardedSafetensorsWriter:
    """Write `plan` into one or more safetensors files, tensor by tensor, in plan order.

    With one shard the file is `<stem>.safetensors`; with several, HF names
    `<stem>-0000i-of-0000N.safetensors` plus `<stem>.safetensors.index.json`.
    """

    def __init__(self, folder: Path, plan: list, max_shard_bytes: int,
                 stem: str = "model", metadata: dict[str, str] | None = None, index: bool = True):
        names = [t.name for t in plan]
        if len(set(names)) != len(names):
            raise InvalidArgument("output plan names a tensor twice")
        self.folder = folder
        self.plan = plan
        self.shards = shard_plan(plan, max_shard_bytes)
        n = len(self.shards)
        self.files = ([f"{stem}.safetensors"] if n == 1 else
                      [f"{stem}-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)])
        self.index_name = f"{stem}.safetensors.index.json" if (index and n > 1) else None
        self.metadata = metadata or {}
        self._order = iter([(i, t) for i, shard in enumerate(self.shards) for t in shard])
        self._fh = None
        self._shard = -1
        self.written = 0

    def write(self, name: str, tensor) -> None:
        """Append the next planned tensor whole (0-d tensors included). Shape and dtype must match
        the plan exactly."""
        from omgtool.formats.dtypes import from_torch

        planned = self._begin(name)
        if tuple(tensor.shape) != planned.shape or from_torch(tensor.dtype) != planned.dtype:
            raise OmgError(f"{name}: got {list(tensor.shape)} {from_torch(tensor.dtype)}, planned "
                           f"{list(planned.shape)} {planned.dtype}")
        self._append(tensor)
        self.written += planned.nbytes

    def write_rows(self, name: str, blocks) -> None:
        """Append the next planned tensor from consecutive row blocks (dim-0 slices, in order),
        so a large tensor never exists whole in memory. The blocks must add up to the plan."""
        from omgtool.formats.dtypes import from_torch

        planned = self._begin(name)
        rows = 0
        for block in blocks:
            if tuple(block.shape[1:]) != planned.shape[1:] or from_torch(block.dtype) != planned.dtype:
                raise OmgError(f"{name}: got a {list(block.shape)} {from_torch(block.dtype)} block, planned "
                               f"{list(planned.shape)} {planned.dtype}")
            rows += block.shape[0]
            if rows > planned.shape[0]:
                raise OmgError(f"{name}: blocks exceed the planned {planned.shape[0]} rows")
            self._append(block)
        if rows != planned.shape[0]:
            raise OmgError(f"{name}: blocks gave {rows} rows, planned {planned.shape[0]}")
        self.written += planned.nbytes

    def _begin(self, name: str):
        """The plan entry `name` must be next; opens its shard."""
        try:
            shard, planned = next(self._order)
        except StopIteration:
            raise OmgError(f"writer got {name} after the plan was complete") from None
        if planned.name != name:
            raise OmgError(f"writer expected {planned.name} next, got {name}")
        if shard != self._shard:
            self._open(shard)
        return planned

    def _append(self, tensor) -> None:
        import torch

        data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        self._fh.write(memoryview(data))

    def _open(self, shard: int) -> None:
        self._close_file()
        self._shard = shard
        self._fh = open(self.folder / self.files[shard], "wb")
        self._fh.write(_header_bytes(self.shards[shard], self.metadata))

    def _close_file(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def close(self) -> list[str]:
        """Finish; writes empty planned shards and the index. Returns the file names."""
        leftover = next(self._order, None)
        if leftover is not None:
            raise OmgError(f"writer closed before {leftover[1].name} was written")
        self._close_file()
        for i, name in enumerate(self.files):
            if not (self.folder / name).exists():  # a shard of zero tensors
                (self.folder / name).write_bytes(_header_bytes(self.shards[i], self.metadata))
        if self.index_name:
            weight_map = {t.name: self.files[i] for i, shard in enumerate(self.shards) for t in shard}
            index = {"metadata": {"total_size": sum(t.nbytes for t in self.plan)}, "weight_map": weight_map}
            write_json(self.folder / self.index_name, index)
        return self.files + ([self.index_name] if self.index_name else [])

    def abort(self) -> None:
        self._close_file()


def verify_written(folder: Path, files: list[str], plan: list) -> list[str]:
    """Re-read the headers just written; return mismatches against the plan (empty = good)."""
    from omgtool.formats.safetensors_file import read_header

    found: dict[str, tuple[tuple[int, ...], str]] = {}
    for name in files:
        if name.endswith(".safetensors"):
            header, _, _ = read_header(folder / name)
            for key, entry in header.items():
                found[key] = (tuple(entry["shape"]), entry["dtype"])
    problems = []
    for t in plan:
        got = found.pop(t.name, None)
        if got is None:
            problems.append(f"{t.name} missing from the output")
        elif got != (t.shape, t.dtype):
            problems.append(f"{t.name}: written {list(got[0])} {got[1]}, planned {list(t.shape)} {t.dtype}")
    problems += [f"{name} written but not planned" for name in found]
    return problems


def write_json(path: Path, data: Any) -> None:
    """Every JSON file omgtool writes: UTF-8, indented, non-ASCII kept as is."""
    Path(path).write_text(json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n", encoding="utf-8")


def patch_metadata(file: Path, planned: dict[str, str], final: dict[str, str]) -> None:
    """Replace a written header's placeholder metadata with the final values (same byte
    length), then re-read the header to confirm."""
    from omgtool.errors import CheckFailed
    from omgtool.formats.safetensors_file import read_header

    old = json.dumps(planned, separators=(",", ":")).encode()
    new = json.dumps(final, separators=(",", ":")).encode()
    if len(old) != len(new):
        raise CheckFailed(f"{file.name}: metadata placeholder and value differ in length")
    with open(file, "r+b") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        raw = fh.read(n)
        at = raw.find(old)
        if at < 0 or raw.find(old, at + 1) >= 0:
            raise CheckFailed(f"{file.name}: metadata placeholder not found once in the header")
        fh.seek(8 + at)
        fh.write(new)
    _, meta, _ = read_header(file)
    if meta != final:
        raise CheckFailed(f"{file.name}: metadata reads back as {meta}, not {final}")
