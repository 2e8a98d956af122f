"""What every reader returns: tensor metadata, and lazy one-tensor-at-a-time reads."""

from __future__ import annotations

import math
import mmap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omgtool.errors import Finding, UnreadableInput
from omgtool.formats.dtypes import ITEMSIZE


@dataclass(frozen=True, slots=True)  # slots: a 100k-tensor header costs half the memory
class TensorInfo:
    """Where one tensor's bytes live. No tensor data is read to build this."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    file: Path  # the file holding the bytes
    data_offset: int  # absolute byte offset of the storage's first element in `file`
    storage_numel: int  # elements in the storage
    storage_offset: int = 0  # elements
    stride: tuple[int, ...] | None = None  # None: contiguous
    storage_key: str = ""

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * ITEMSIZE[self.dtype]

    @property
    def strides(self) -> tuple[int, ...]:
        if self.stride is not None:
            return self.stride
        out, acc = [], 1
        for size in reversed(self.shape):
            out.append(acc)
            acc *= size
        return tuple(reversed(out))

    @property
    def location(self) -> str:
        where = self.storage_key or self.file.name
        return f"{where}+{self.data_offset + self.storage_offset * ITEMSIZE[self.dtype]}"

    def extent(self) -> int:
        """Elements of the storage this view needs: offset + 1 + sum((size-1)*stride)."""
        if self.numel == 0:
            return self.storage_offset
        return self.storage_offset + 1 + sum((n - 1) * s for n, s in zip(self.shape, self.strides))


@dataclass
class SafetyReport:
    verdict: str = "safe"  # "safe" | "unknown" | "dangerous" (worst finding grade) | "not-a-pickle"
    findings: list[Finding] = field(default_factory=list)
    globals_seen: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"verdict": self.verdict, "findings": [f.as_dict() for f in self.findings],
                "globals": self.globals_seen}


@dataclass
class Checkpoint:
    """A set of named tensors from one file or folder, read lazily."""

    path: Path
    format: str
    tensors: dict[str, TensorInfo]
    safety: SafetyReport = field(default_factory=SafetyReport)
    container: str | None = None  # wrapper key the state dict sat under ("module", "state_dict")
    metadata: dict[str, Any] = field(default_factory=dict)  # non-tensor entries, configs
    files: list[Path] = field(default_factory=list)  # every file the tensors live in
    # tensors outside the model's state dict -> their group ("optimizer", "scheduler", "extra")
    groups: dict[str, str] = field(default_factory=dict)
    _maps: dict[Path, mmap.mmap] = field(default_factory=dict, repr=False)

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def __len__(self) -> int:
        return len(self.tensors)

    @property
    def num_params(self) -> int:
        return sum(t.numel for t in self.tensors.values())

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def read(self, name: str):
        """The tensor `name` as a torch view over a private (copy-on-write) mmap.

        Only this tensor's pages are touched. The view stays valid after close().
        """
        import torch

        from omgtool.formats.dtypes import torch_dtype

        info = self.tensors[name]
        buf = self._map(info.file)
        itemsize = ITEMSIZE[info.dtype]
        if info.data_offset + info.storage_numel * itemsize > len(buf):
            raise UnreadableInput(f"tensor {name} extends past the end of the file", info.file)
        if info.storage_numel == 0:
            return torch.empty(info.shape, dtype=torch_dtype(info.dtype))
        flat = torch.frombuffer(buf, dtype=torch_dtype(info.dtype), count=info.storage_numel,
                                offset=info.data_offset)
        return flat.as_strided(info.shape, info.strides, info.storage_offset)

    def _map(self, file: Path) -> mmap.mmap:
        buf = self._maps.get(file)
        if buf is None:
            with open(file, "rb") as fh:
                buf = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
            self._maps[file] = buf
        return buf

    def release(self, name: str) -> None:
        """Drop the mapped pages behind `name` from this process's memory (streaming writers
        call it once a tensor is written, so RSS holds one tensor, not the whole file).

        Pages stay in the OS page cache; a later read faults them back in from the file, so
        views stay correct as long as nobody wrote into them (reads here never do).
        """
        info = self.tensors[name]
        buf = self._maps.get(info.file)
        if buf is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        page = mmap.PAGESIZE
        start = info.data_offset // page * page
        end = min(len(buf), info.data_offset + info.storage_numel * ITEMSIZE[info.dtype])
        if end > start:
            buf.madvise(mmap.MADV_DONTNEED, start, end - start)

    def close(self) -> None:
        self._maps.clear()  # tensors still viewing a map keep it alive

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


INT64_MAX = (1 << 63) - 1
MAX_NDIM = 64


def printable_name(text: str) -> str:
    """`text` with lone surrogates and control characters escaped (`\\ud800`, `\\n`), so a name
    from a hostile file can always be printed, written as JSON, or put in an error line."""
    if text.isprintable():  # lone surrogates (category Cs) are not printable either
        return text
    return "".join(c if c.isprintable() and not "\ud800" <= c <= "\udfff"
                   else c.encode("unicode_escape", "backslashreplace").decode("ascii") for c in text)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_geometry(info: TensorInfo, ckpt_path: Path) -> None:
    """Everything torch's `as_strided` and allocator would reject, refused before they see it:
    unknown dtypes, negative or non-integer sizes, strides and offsets, stride/shape length
    mismatch, element counts or byte sizes past int64, a view past its storage."""
    name = info.name
    if info.dtype not in ITEMSIZE:
        raise UnreadableInput(f"tensor {name} has unknown dtype {info.dtype}", ckpt_path)
    itemsize = ITEMSIZE[info.dtype]
    if len(info.shape) > MAX_NDIM:
        raise UnreadableInput(f"tensor {name} has {len(info.shape)} dimensions (more than {MAX_NDIM})",
                              ckpt_path)
    values = [*info.shape, *info.strides, info.storage_offset, info.storage_numel]
    if not all(_is_int(v) for v in values):
        raise UnreadableInput(f"tensor {name} has a non-integer size, stride or offset", ckpt_path)
    if any(v < 0 for v in values):
        raise UnreadableInput(f"tensor {name} has a negative size, stride or offset (shape "
                              f"{list(info.shape)}, stride {list(info.strides)}, offset "
                              f"{info.storage_offset})", ckpt_path)
    if len(info.strides) != len(info.shape):
        raise UnreadableInput(f"tensor {name} has {len(info.shape)} sizes but {len(info.strides)} strides",
                              ckpt_path)
    if info.numel * itemsize > INT64_MAX or info.storage_numel * itemsize > INT64_MAX:
        raise UnreadableInput(f"tensor {name} is too large: shape {list(info.shape)} of {info.dtype} "
                              f"overflows int64 bytes", ckpt_path)
    if info.extent() > info.storage_numel:
        raise UnreadableInput(
            f"storage {info.storage_key or '?'} holds {info.storage_numel} elements but tensor "
            f"{name} (shape {list(info.shape)}, stride {list(info.strides)}, offset "
            f"{info.storage_offset}) needs {info.extent()}", ckpt_path)
    if info.storage_offset * itemsize > INT64_MAX:
        raise UnreadableInput(f"tensor {name} has an offset past int64 bytes", ckpt_path)


def check_extents(ckpt_path: Path, tensors: dict[str, TensorInfo]) -> None:
    for info in tensors.values():
        check_geometry(info, ckpt_path)
