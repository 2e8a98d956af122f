"""Compare two checkpoints, or a checkpoint and a shape manifest: `omgtool diff` as a library.

    from omgtool.ops.diff import diff_paths, Tolerance
    report = diff_paths("omg_llava_7b_pretrain_8gpus.pth", "omg_llava_7b_finetune_8gpus.pth")
    report["differences"], report["value_changed"][0]["a"], report["value_changed"][0]["b"]

Pairing (`pair_keys`) is driven by `mappings/`: each key's `KeyMatch.canonical`
(`component:weight#role`) sees through PEFT wrappers (`llm.model.X` and
`llm.base_model.model.model.X`; `output.weight` and `output.base_layer.weight`) and through
family prefixes (an InternLM2 HF folder, prefix "", against the `llm.` part of an
OMG-LLaVA checkpoint). Keys no mapping explains, and keys whose canonical name is not
unique in their file, pair by exact name.

Values (`compare_values`) stream one tensor pair at a time, a block of elements at a
time, decoded with numpy (no torch import on the common path) to float32 when both dtypes
fit it exactly (bf16, fp16, fp32: as numpy's own allclose computes), else float64: memory is a
few blocks, never a checkpoint, at most the two tensors for strided views. Tensors of the
same dtype are first compared byte for byte; only differing ones get the numeric pass.
Tolerance is numpy `allclose`: |a - b| <= atol + rtol * |b| elementwise; the default
(0, 0) is exact. NaN in both files at the same position counts as equal.

Embedding-like matrices (the mapping says dim 0 is `vocab_size`: tok_embeddings,
output / lm_head and their LoRA B) whose row counts differ are compared on their shared
rows; the extra rows are reported as `rows_added` (B has more) or `rows_removed`.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from omgtool.errors import InvalidArgument
from omgtool.formats.base import Checkpoint, TensorInfo
from omgtool.formats.dtypes import ITEMSIZE, NUMPY_LAYOUT
from omgtool.progress import NULL_PROGRESS, Progress

BLOCK_ELEMENTS = 1 << 20  # elements read from disk at a time, per side
CHUNK_ELEMENTS = 1 << 18  # elements per numeric step (float64 arrays stay cache-sized)
VOCAB_DIM = "vocab_size"  # the mapping's name for a row dimension indexed by token id
COMPLEX = ("C64", "C128")  # compared as (re, im) pairs: their counts are of scalars


# --- pairing --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Pair:
    a: str
    b: str
    canonical: str | None  # the mapping's component:weight#role; None when paired by exact name
    match: Any = None  # KeyMatch of either side, when a mapping explains the key


@dataclass
class Pairing:
    pairs: list[Pair]
    only_a: list[str]
    only_b: list[str]
    notes: list[str] = field(default_factory=list)


def pair_keys(keys_a: list[str], matches_a: dict, keys_b: list[str], matches_b: dict,
              normalize: bool = True) -> Pairing:
    """Pair keys of A and B: by the mappings' canonical names, then the rest by exact name.

    `matches_*` are `Analysis.matches` (key -> KeyMatch). A canonical name that two keys of
    one file share (e.g. two PEFT adapters) is ambiguous: those keys pair by exact name.
    Pairs come in A's key order.
    """
    notes: list[str] = []
    by_canon_a: dict[str, str] = {}
    by_canon_b: dict[str, str] = {}
    if normalize:
        for label, keys, matches, table in (("A", keys_a, matches_a, by_canon_a),
                                            ("B", keys_b, matches_b, by_canon_b)):
            seen: dict[str, list[str]] = defaultdict(list)
            for key in keys:
                if key in matches:
                    seen[matches[key].canonical].append(key)
            for canon, owners in seen.items():
                if len(owners) == 1:
                    table[canon] = owners[0]
                else:
                    notes.append(f"{label}: {len(owners)} keys share the normalized name {canon} "
                                 f"({', '.join(owners[:3])}); they pair by exact name")
    b_for_a: dict[str, Pair] = {}
    paired_b: set[str] = set()
    for canon, ka in by_canon_a.items():
        kb = by_canon_b.get(canon)
        if kb is not None:
            b_for_a[ka] = Pair(ka, kb, canon, matches_a.get(ka) or matches_b.get(kb))
            paired_b.add(kb)
    rest_b = {k for k in keys_b if k not in paired_b}
    pairs, only_a = [], []
    for ka in keys_a:
        if ka in b_for_a:
            pairs.append(b_for_a[ka])
        elif ka in rest_b:
            pairs.append(Pair(ka, ka, None, matches_a.get(ka) or matches_b.get(ka)))
            paired_b.add(ka)
        else:
            only_a.append(ka)
    only_b = [k for k in keys_b if k not in paired_b]
    return Pairing(pairs, only_a, only_b, notes)


# --- tolerance and value deltas -------------------------------------------------------------

@dataclass(frozen=True)
class Tolerance:
    """numpy allclose: |a - b| <= atol + rtol * |b|, elementwise. (0, 0) means exact."""

    atol: float = 0.0
    rtol: float = 0.0

    def __post_init__(self):
        for name in ("atol", "rtol"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise InvalidArgument(f"--{name} must be a finite number >= 0, got {value!r}")

    @property
    def exact(self) -> bool:
        return self.atol == 0 and self.rtol == 0


@dataclass
class ValueDelta:
    """Deltas of one tensor pair over `numel` compared elements (B relative to A)."""

    numel: int
    max_abs: float = 0.0  # max |a - b|
    rel_l2: float | None = 0.0  # ||a - b|| / ||a||; None when both are all zero
    cosine: float | None = None  # <a, b> / (||a|| ||b||); None when either is all zero
    differing: int = 0  # elements with a != b (NaN at the same place counts as equal)
    mismatched: int = 0  # elements outside the tolerance
    nonfinite: int = 0  # elements where either side is NaN or Inf (left out of the norms)
    bytewise_identical: bool = False

    @property
    def identical(self) -> bool:
        return self.differing == 0

    @property
    def within_tolerance(self) -> bool:
        return self.mismatched == 0

    def as_dict(self) -> dict[str, Any]:
        return {"numel": self.numel, "max_abs": _num(self.max_abs), "rel_l2": _num(self.rel_l2),
                "cosine": _num(self.cosine), "differing": self.differing, "mismatched": self.mismatched,
                "nonfinite": self.nonfinite}


def _num(x: float | None):
    """JSON-safe float: NaN / Inf become the strings 'nan', 'inf', '-inf'."""
    if x is None or math.isfinite(x):
        return x
    return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")


def _dot(u, v) -> float:
    """sum(u * v) accumulated in float64, never through BLAS: OpenBLAS threads its dot
    kernels and, on a busy machine, spinning threads made `u @ v` 10x slower."""
    import numpy as np

    return float(np.einsum("i,i->", u, v, dtype=np.float64))


class _Accumulator:
    def __init__(self, tol: Tolerance):
        self.tol = tol
        self.sum_d2 = self.sum_a2 = self.sum_b2 = self.dot = 0.0
        self.max_abs = 0.0
        self.differing = self.mismatched = self.nonfinite = self.numel = 0

    def add(self, a, b) -> None:
        """a, b: float32 or float64 numpy arrays of equal length (sums go to Python floats)."""
        import numpy as np

        n = a.size
        self.numel += n
        sa, sb = _dot(a, a), _dot(b, b)
        if math.isfinite(sa) and math.isfinite(sb):  # no NaN/Inf in either: the fast path
            d = a - b
            np.abs(d, out=d)
            self.sum_d2 += _dot(d, d)
            self.sum_a2 += sa
            self.sum_b2 += sb
            self.dot += _dot(a, b)
            if n:  # max(nan, x) keeps nan: a NaN from an earlier chunk stays
                self.max_abs = max(self.max_abs, float(d.max()))
            differing = int(np.count_nonzero(d))
            self.differing += differing
            if self.tol.exact:
                self.mismatched += differing
            elif differing:
                bound = np.abs(b)
                bound *= self.tol.rtol
                bound += self.tol.atol
                self.mismatched += int(np.count_nonzero(d > bound))
            return
        a, b = a.astype(np.float64), b.astype(np.float64)  # NaN/Inf (or float32 overflow): slow path
        nan_a, nan_b = np.isnan(a), np.isnan(b)
        same = (a == b) | (nan_a & nan_b)
        with np.errstate(invalid="ignore", over="ignore"):
            d = np.abs(a - b)
            d[same] = 0.0
            close = same | (d <= self.tol.atol + self.tol.rtol * np.abs(b))
        self.differing += n - int(np.count_nonzero(same))
        self.mismatched += n - int(np.count_nonzero(close))
        finite = np.isfinite(a) & np.isfinite(b)
        self.nonfinite += n - int(np.count_nonzero(finite))
        if n:  # NaN against a number makes max |a-b| NaN, and it stays NaN
            worst = float(d.max())
            self.max_abs = math.nan if math.isnan(worst) or math.isnan(self.max_abs) \
                else max(self.max_abs, worst)
        fa, fb, fd = a[finite], b[finite], d[finite]
        self.sum_d2 += _dot(fd, fd)
        self.sum_a2 += _dot(fa, fa)
        self.sum_b2 += _dot(fb, fb)
        self.dot += _dot(fa, fb)

    def result(self) -> ValueDelta:
        if self.sum_a2 > 0:
            rel = math.sqrt(self.sum_d2) / math.sqrt(self.sum_a2)
        else:
            rel = None if self.sum_d2 == 0 else math.inf
        if self.sum_a2 > 0 and self.sum_b2 > 0:
            cosine = max(-1.0, min(1.0, self.dot / (math.sqrt(self.sum_a2) * math.sqrt(self.sum_b2))))
        else:
            cosine = None
        if self.differing == 0 and self.sum_a2 > 0:
            rel, cosine = 0.0, 1.0
        return ValueDelta(self.numel, self.max_abs, rel, cosine, self.differing, self.mismatched,
                          self.nonfinite)


# numpy decoding: canonical dtype -> (numpy dtype, scalars per element)
# dtypes whose every value a float32 holds exactly: pairs of these are compared in float32
# (what numpy's allclose itself does for float32 arrays); anything else in float64.
EXACT_IN_F32 = {"F32", "F16", "BF16", "F8_E4M3", "F8_E5M2", "I16", "U16", "I8", "U8", "BOOL"}


def compute_dtype(dtype_a: str, dtype_b: str) -> str:
    return "float32" if dtype_a in EXACT_IN_F32 and dtype_b in EXACT_IN_F32 else "float64"


def decode(raw, dtype: str, count: int, out: str = "float64"):
    """`count` elements of `dtype` from bytes -> numpy array of `out` (complex: (re, im) pairs)."""
    import numpy as np

    if dtype == "BF16":  # bf16 is the top half of a float32: exact
        u = np.frombuffer(raw, dtype="<u2", count=count).astype("<u4")
        u <<= 16
        return u.view("<f4").astype(out, copy=False)
    if dtype in NUMPY_LAYOUT:
        np_dtype, per = NUMPY_LAYOUT[dtype]
        return np.frombuffer(raw, dtype=np_dtype, count=count * per).astype(out)
    import torch  # float8 and anything numpy lacks

    from omgtool.formats.dtypes import torch_dtype

    t = torch.frombuffer(bytearray(raw[:count * ITEMSIZE[dtype]]), dtype=torch_dtype(dtype), count=count)
    return t.to(torch.float64).numpy().astype(out, copy=False)


def is_contiguous(info: TensorInfo) -> bool:
    if info.stride is None:
        return True
    return all(s == c for n, s, c in zip(info.shape, info.stride, _contiguous_strides(info.shape)) if n > 1)


def _contiguous_strides(shape) -> tuple[int, ...]:
    out, acc = [], 1
    for size in reversed(shape):
        out.append(acc)
        acc *= size
    return tuple(reversed(out))


class BlockReader:
    """Reads a contiguous tensor's bytes block by block with plain file reads (no mmap, so
    nothing stays resident in this process), one open descriptor per file."""

    def __init__(self):
        self._files: dict[Path, Any] = {}

    def blocks(self, info: TensorInfo, count: int, block: int = BLOCK_ELEMENTS) -> Iterator[bytes]:
        """The first `count` elements of `info`, as bytes of up to `block` elements each.

        Positional reads (os.pread): safe when two threads read the same file."""
        import os

        from omgtool.errors import UnreadableInput

        itemsize = ITEMSIZE[info.dtype]
        fd = self._files.get(info.file)
        if fd is None:
            fd = self._files[info.file] = os.open(info.file, os.O_RDONLY)
        pos = info.data_offset + info.storage_offset * itemsize
        done = 0
        while done < count:
            n = min(block, count - done)
            raw = os.pread(fd, n * itemsize, pos + done * itemsize)
            if len(raw) != n * itemsize:
                raise UnreadableInput(f"tensor {info.name} extends past the end of the file", info.file)
            yield raw
            done += n

    def close(self) -> None:
        import os

        for fd in self._files.values():
            os.close(fd)
        self._files.clear()


_END = object()


def _prefetched(items: Iterator, depth: int = 3) -> Iterator:
    """Run `items` (reads and decodes) in a background thread, `depth` items ahead, so disk
    reads and decoding overlap the comparison. Errors re-raise here; stops if abandoned."""
    import queue
    import threading

    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for item in items:
                if not put(item):
                    return
            put(_END)
        except BaseException as exc:  # handed to the consumer
            put(exc)

    thread = threading.Thread(target=work, name="omgtool-diff-read", daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join()


def _strided_chunks(ckpt: Checkpoint, info: TensorInfo, rows: int | None, out: str) -> Iterator:
    """Fallback for non-contiguous views: torch over the checkpoint's mmap (bounded by the tensor)."""
    import torch

    t = ckpt.read(info.name)
    if rows is not None:
        t = t[:rows]
    flat = t.reshape(-1)
    for start in range(0, flat.numel(), CHUNK_ELEMENTS):
        piece = flat[start:start + CHUNK_ELEMENTS]
        if piece.is_complex():
            piece = torch.view_as_real(piece.contiguous()).reshape(-1)
        yield piece.to(torch.float64).numpy().astype(out, copy=False)


def _float_chunks(ckpt: Checkpoint, info: TensorInfo, count: int, reader: BlockReader,
                  rows: int | None, on_bytes: Callable[[int], None], out: str) -> Iterator:
    if not is_contiguous(info):
        itemsize = ITEMSIZE[info.dtype]
        for arr in _strided_chunks(ckpt, info, rows, out):
            on_bytes(arr.size * itemsize)
            yield arr
        return
    for raw in reader.blocks(info, count):
        on_bytes(len(raw))
        yield decode(raw, info.dtype, len(raw) // ITEMSIZE[info.dtype], out)


def _aligned(chunks_a: Iterator, chunks_b: Iterator) -> Iterator[tuple[Any, Any]]:
    """Re-cut two streams of arrays (chunked differently) into equal-length pairs."""
    buf_a = buf_b = None
    while True:
        if buf_a is None or buf_a.size == 0:
            buf_a = next(chunks_a, None)
        if buf_b is None or buf_b.size == 0:
            buf_b = next(chunks_b, None)
        if buf_a is None or buf_b is None:
            return
        n = min(buf_a.size, buf_b.size, CHUNK_ELEMENTS)
        yield buf_a[:n], buf_b[:n]
        buf_a, buf_b = buf_a[n:], buf_b[n:]


def compare_values(ckpt_a: Checkpoint, info_a: TensorInfo, ckpt_b: Checkpoint, info_b: TensorInfo,
                   tol: Tolerance = Tolerance(), rows: int | None = None, reader: BlockReader | None = None,
                   on_bytes: Callable[[int], None] | None = None) -> ValueDelta:
    """Deltas of B against A, streamed. `rows`: compare only the first `rows` rows (dim 0)."""
    own_reader = reader is None
    reader = reader or BlockReader()
    on_bytes = on_bytes or (lambda n: None)
    shape = info_a.shape
    if rows is not None:
        shape = (rows, *shape[1:])
    count = math.prod(shape)
    try:
        if (info_a.dtype == info_b.dtype and is_contiguous(info_a) and is_contiguous(info_b)):
            if all(x == y for x, y in zip(reader.blocks(info_a, count), reader.blocks(info_b, count))):
                on_bytes(2 * count * ITEMSIZE[info_a.dtype])
                delta = ValueDelta(count, 0.0, 0.0 if count else None, None, 0, 0, 0, True)
                return delta
        acc = _Accumulator(tol)
        out = compute_dtype(info_a.dtype, info_b.dtype)
        chunks_a = _float_chunks(ckpt_a, info_a, count, reader, rows, on_bytes, out)
        chunks_b = _float_chunks(ckpt_b, info_b, count, reader, rows, on_bytes, out)
        if count > BLOCK_ELEMENTS:  # big tensors: read and decode ahead in background threads
            chunks_a, chunks_b = _prefetched(chunks_a), _prefetched(chunks_b)
        for a, b in _aligned(chunks_a, chunks_b):
            acc.add(a, b)
        if acc.numel != count * (2 if info_a.dtype in COMPLEX else 1):
            raise InvalidArgument(f"read {acc.numel} values of {info_a.name} / {info_b.name}, "
                                  f"expected {count}")
        return acc.result()
    finally:
        for ckpt, info in ((ckpt_a, info_a), (ckpt_b, info_b)):
            if not is_contiguous(info):
                ckpt.close()  # drop the mmap the strided fallback used, so its pages leave RSS
        if own_reader:
            reader.close()


# --- the diff -------------------------------------------------------------------------------

@dataclass
class Side:
    path: Path
    ckpt: Checkpoint
    analysis: Any  # omgtool.arch.infer.Analysis
    manifest: bool

    @property
    def unexplained(self) -> set[str]:
        return set(self.analysis.unexplained)

    def group(self, key: str) -> str:
        m = self.analysis.matches.get(key)
        return m.group if m is not None else "unexplained"

    def describe(self) -> dict[str, Any]:
        return {"path": str(self.path), "format": self.ckpt.format, "kind": "manifest" if self.manifest
                else "checkpoint", "family": self.analysis.family_name, "stage": self.analysis.stage,
                "num_tensors": len(self.ckpt.tensors), "safety": self.ckpt.safety.verdict}


def open_side(path: str | Path, family: str | None = None) -> Side:
    """Open a checkpoint or manifest (metadata only) and match its keys to the mappings."""
    from omgtool.formats import open_checkpoint
    from omgtool.formats.manifest import is_manifest
    from omgtool.arch.infer import analyze

    ckpt = open_checkpoint(path)
    return Side(Path(path), ckpt, analyze(ckpt, family=family), is_manifest(ckpt))


def row_change(pair: Pair, ia: TensorInfo, ib: TensorInfo) -> bool:
    """True when the mapping says dim 0 indexes tokens and only that dim differs."""
    m = pair.match
    if m is None or m.role not in ("weight", "lora_B") or not m.spec.dims or m.spec.dims[0] != VOCAB_DIM:
        return False
    return (len(ia.shape) == len(ib.shape) >= 1 and ia.shape[0] != ib.shape[0]
            and ia.shape[1:] == ib.shape[1:])


def diff_paths(path_a: str | Path, path_b: str | Path, **kwargs) -> dict[str, Any]:
    """Open both inputs (A first: its errors win) and diff them. See `diff_sides`."""
    side_a = open_side(path_a)
    side_b = open_side(path_b)
    return diff_sides(side_a, side_b, **kwargs)


def diff_sides(a: Side, b: Side, *, normalize: bool = True, shapes_only: bool = False,
               tol: Tolerance = Tolerance(), strict: bool = False, check_hash: bool = False,
               progress: Progress = NULL_PROGRESS) -> dict[str, Any]:
    """The diff report (JSON-ready). `report["differences"]` > 0 means the inputs differ.

    Against a manifest only names, shapes and dtypes compare (a null manifest dtype is not
    checked). Keys only in one input that no mapping explains are listed apart
    (`unexplained_only_in_a/b`); they count as differences, except a checkpoint's extras
    against a manifest (the manifest lists what is known; unknown extras are reported, not
    failed) unless `strict`.
    """
    pairing = pair_keys(list(a.ckpt.tensors), a.analysis.matches, list(b.ckpt.tensors),
                        b.analysis.matches, normalize)
    notes = list(pairing.notes)
    values = not shapes_only and not a.manifest and not b.manifest
    if not shapes_only and (a.manifest or b.manifest):
        notes.append("values not compared: a manifest holds names, shapes and dtypes only")

    def listed(side: Side, key: str) -> dict[str, Any]:
        info = side.ckpt.tensors[key]
        return {"name": key, "shape": list(info.shape), "dtype": info.dtype, "group": side.group(key)}

    report: dict[str, Any] = {"a": a.describe(), "b": b.describe(), "normalized": normalize,
                              "tolerance": {"atol": tol.atol, "rtol": tol.rtol},
                              "values_compared": values}
    un_a, un_b = a.unexplained, b.unexplained
    report["only_in_a"] = [listed(a, k) for k in pairing.only_a if k not in un_a]
    report["only_in_b"] = [listed(b, k) for k in pairing.only_b if k not in un_b]
    report["unexplained_only_in_a"] = [listed(a, k) for k in pairing.only_a if k in un_a]
    report["unexplained_only_in_b"] = [listed(b, k) for k in pairing.only_b if k in un_b]
    ignore_a = b.manifest and not a.manifest and not strict
    ignore_b = a.manifest and not b.manifest and not strict
    report["unexplained_ignored"] = {"a": ignore_a, "b": ignore_b}
    for label, ignored, other in (("a", ignore_a, "b"), ("b", ignore_b, "a")):
        if ignored and report[f"unexplained_only_in_{label}"]:
            notes.append(f"{len(report[f'unexplained_only_in_{label}'])} keys only in {label.upper()} are "
                         f"explained by no mapping and absent from the manifest {other.upper()}: reported, "
                         "not counted as differences (--strict counts them)")

    report["renamed"] = [{"a": p.a, "b": p.b, "canonical": p.canonical} for p in pairing.pairs if p.a != p.b]
    shape_changed, dtype_changed, rows_added, rows_removed, to_compare = [], [], [], [], []
    for p in pairing.pairs:
        ia, ib = a.ckpt.tensors[p.a], b.ckpt.tensors[p.b]
        if ia.dtype is not None and ib.dtype is not None and ia.dtype != ib.dtype:
            dtype_changed.append({"a": p.a, "b": p.b, "dtype_a": ia.dtype, "dtype_b": ib.dtype})
        if (ia.dtype in COMPLEX) != (ib.dtype in COMPLEX):
            notes.append(f"{p.b}: complex against real values, only the dtype is compared")
        elif ia.shape == ib.shape:
            to_compare.append((p, None))
        elif row_change(p, ia, ib):
            shared = min(ia.shape[0], ib.shape[0])
            big = max(ia.shape[0], ib.shape[0])
            entry = {"a": p.a, "b": p.b, "rows_a": ia.shape[0], "rows_b": ib.shape[0], "count": big - shared,
                     "first": shared, "last": big - 1, "shared_rows": shared}
            (rows_added if ib.shape[0] > ia.shape[0] else rows_removed).append(entry)
            to_compare.append((p, shared))
        else:
            shape_changed.append({"a": p.a, "b": p.b, "shape_a": list(ia.shape), "shape_b": list(ib.shape),
                                  "dtype_a": ia.dtype, "dtype_b": ib.dtype})
    report["shape_changed"] = shape_changed
    report["dtype_changed"] = dtype_changed
    report["rows_added"] = rows_added
    report["rows_removed"] = rows_removed

    value_changed, within, identical = [], [], 0
    if values:
        progress.task("comparing", total=sum(_compare_bytes(a.ckpt.tensors[p.a], b.ckpt.tensors[p.b], rows)
                                             for p, rows in to_compare))
        row_entries = {(e["a"], e["b"]): e for e in rows_added + rows_removed}
        reader = BlockReader()
        try:
            for p, rows in to_compare:
                delta = compare_values(a.ckpt, a.ckpt.tensors[p.a], b.ckpt, b.ckpt.tensors[p.b], tol,
                                       rows=rows, reader=reader, on_bytes=progress.advance)
                entry = {"a": p.a, "b": p.b, **delta.as_dict()}
                if rows is not None:
                    entry["shared_rows"] = rows
                    row_entries[(p.a, p.b)]["shared_rows_identical"] = delta.identical
                if delta.identical:
                    identical += 1
                elif delta.within_tolerance:
                    within.append(entry)
                else:
                    value_changed.append(entry)
        finally:
            reader.close()
    report["value_changed"] = value_changed
    report["within_tolerance"] = within
    report["identical"] = identical
    report["values_checked"] = len(to_compare) if values else 0

    if check_hash:
        report["hash"] = _check_hash(a, b)

    counted = {
        "only_in_a": len(report["only_in_a"]), "only_in_b": len(report["only_in_b"]),
        "unexplained_only_in_a": 0 if ignore_a else len(report["unexplained_only_in_a"]),
        "unexplained_only_in_b": 0 if ignore_b else len(report["unexplained_only_in_b"]),
        "shape_changed": len(shape_changed), "dtype_changed": len(dtype_changed),
        "rows_added": len(rows_added), "rows_removed": len(rows_removed),
        "value_changed": len(value_changed),
        "hash_changed": int(check_hash and not report["hash"]["match"]),
    }
    report["summary"] = {"paired": len(pairing.pairs), "renamed": len(report["renamed"]),
                         "identical": identical, "within_tolerance": len(within), **counted}
    report["differences"] = sum(counted.values())
    report["notes"] = notes
    return report


def _compare_bytes(ia: TensorInfo, ib: TensorInfo, rows: int | None) -> int:
    """Bytes a value comparison reads at most (both sides), for progress bars."""
    shape = ia.shape if rows is None else (rows, *ia.shape[1:])
    return math.prod(shape) * (ITEMSIZE[ia.dtype] + ITEMSIZE[ib.dtype])


def _check_hash(a: Side, b: Side) -> dict[str, Any]:
    """sha256 of the checkpoint's files (one per file) against the manifest's recorded ones."""
    from omgtool.formats.hashing import sha256_files

    for manifest, other in ((a, b), (b, a)):
        meta = manifest.ckpt.metadata if manifest.manifest else {}
        expected = meta.get("sha256_files") or None
        if expected is None and meta.get("sha256"):
            if len(other.ckpt.files) > 1:
                raise InvalidArgument("the manifest records one sha256 for a checkpoint of several files "
                                      "(an older omgtool); re-create it with inspect --manifest --hash")
            expected = {Path(f).name: meta["sha256"] for f in other.ckpt.files}
        if expected and not other.manifest:
            actual = sha256_files(other.ckpt.files)
            single = len(expected) == 1 and len(actual) == 1
            return {"expected": next(iter(expected.values())) if single else expected,
                    "actual": next(iter(actual.values())) if single else actual,
                    "match": sorted(actual.values()) == sorted(expected.values()) if single else actual == expected,
                    "files": [str(f) for f in other.ckpt.files]}
    raise InvalidArgument("--hash needs one input to be a manifest that records a sha256 "
                          "(omgtool inspect CKPT --manifest OUT.json --hash) and the other a checkpoint")
