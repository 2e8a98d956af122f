"""The kernels a PlannedTensor names: each turns its sources into the output tensor, as
row blocks (dim-0 slices, in order) so a large tensor never exists whole in memory.

Numerics live in omgtool.kernels (lora, transforms); this module only reads the sources,
calls them, and drops each source's pages once a block is done (Checkpoint.release), so
resident memory holds about one block of each source.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterator

from omgtool.plan.model import PlannedTensor

CHUNK_BYTES = {"cpu": 64 << 20, "cuda": 512 << 20}  # float32 bytes per row block


def chunk_rows(shape: tuple[int, ...], device: str) -> int:
    cols = math.prod(shape[1:]) or 1
    return max(1, CHUNK_BYTES["cuda" if device.startswith("cuda") else "cpu"] // (4 * cols))


def base_step(t: PlannedTensor, w, rows: int, device: str, run):
    """The weight step params["base_transform"] names (omgtool.kernels.transforms.WEIGHT_TRANSFORMS),
    built over source tensor `w`, or None."""
    name = t.params.get("base_transform")
    if not name:
        return None
    from omgtool.kernels.transforms import WEIGHT_TRANSFORMS

    return WEIGHT_TRANSFORMS[name](lambda start, stop: w[start:stop], t.shape, t.params, rows, device,
                                   lambda: run.release(t.sources[:1]))


def _keep_record(t: PlannedTensor, step, run) -> None:
    from omgtool.kernels.transforms import WEIGHT_TRANSFORM_RECORDS

    record = step.record()
    if record is not None:
        run.records.setdefault(WEIGHT_TRANSFORM_RECORDS[t.params["base_transform"]], {})[t.name] = record


def copy(t: PlannedTensor, run) -> Iterator[Any]:
    """sources[0], cast to t.dtype when it differs (else the bytes as they are); with
    params["base_transform"] its rows go through that weight step first (on the CPU)."""
    from omgtool.formats.dtypes import torch_dtype

    src = run.read(t.sources[0])
    out_dt = torch_dtype(t.dtype)
    if src.dim() == 0:
        yield src.to(out_dt)
        return
    rows = chunk_rows(t.shape, "cpu")
    step = base_step(t, src, rows, "cpu", run)
    if step is not None:
        rows = step.rows
    for start in range(0, t.shape[0], rows):
        block = src[start:start + rows]
        if step is not None:
            block = step(start, block)
        yield block if block.dtype == out_dt else block.to(out_dt)
        del block
        run.release(t.sources)
    if step is not None:
        _keep_record(t, step, run)


def lora_merge(t: PlannedTensor, run) -> Iterator[Any]:
    """W + scale * B @ A (omgtool.kernels.lora.merge_lora) per row block, on run.device.

    params: scale, transposed (embedding / fan_in_fan_out LoRA), rank, alpha; optional
    base_transform (a name in omgtool.kernels.transforms.WEIGHT_TRANSFORMS, e.g. the NF4 round
    trip) applied to W's rows before the update, its record kept in run.records. The update's
    Frobenius norm goes to run.records["deltas"]."""
    from omgtool.formats.dtypes import torch_dtype
    from omgtool.kernels.lora import delta_norm, merge_lora, oriented

    w_src, a_src, b_src = t.sources
    p = t.params
    a, b = oriented(run.read(a_src), run.read(b_src), p.get("transposed", False))
    if run.device != "cpu":
        a, b = a.to(run.device), b.to(run.device)
    run.records.setdefault("deltas", {})[t.name] = {
        "rank": p["rank"], "alpha": p["alpha"], "scale": p["scale"],
        "frobenius_norm": delta_norm(a, b, p["scale"]), "lora_A": a_src.key, "lora_B": b_src.key}
    w = run.read(w_src)
    out_dt = torch_dtype(t.dtype)
    rows = chunk_rows(t.shape, run.device)
    step = base_step(t, w, rows, run.device, run)
    if step is not None:
        rows = step.rows
    for start in range(0, t.shape[0], rows):
        stop = min(start + rows, t.shape[0])
        block = w[start:stop]
        if step is not None:
            block = step(start, block)
        out = merge_lora(block, a, b[start:stop], p["scale"], out_dtype=out_dt, chunk_rows=rows, device=run.device)
        del block
        run.release(t.sources)
        yield out
        del out
    if step is not None:
        _keep_record(t, step, run)


def transform(t: PlannedTensor, run) -> Iterator[Any]:
    """Piece params["index"] of TRANSFORMS[t.transform] applied to sources[0] (row transforms,
    so a LoRA's B splits like its weight); with sources (W, A, B) the LoRA is folded into W
    first (params scale, transposed). One source's pieces are computed once for all of them."""
    from omgtool.formats.dtypes import torch_dtype
    from omgtool.kernels.lora import merge_lora, oriented
    from omgtool.kernels.transforms import apply

    key = (t.sources, t.transform)
    if run.cache_key != key:
        if run.cache_key is not None:
            run.release(run.cache_key[0])
        value = run.read(t.sources[0])
        if len(t.sources) == 3:
            a, b = oriented(run.read(t.sources[1]), run.read(t.sources[2]), t.params.get("transposed", False))
            value = merge_lora(value, a, b, t.params["scale"], out_dtype=torch_dtype(t.dtype))
        run.cache_key, run.cache = key, apply(t.transform, value, t.params.get("heads", {}))
    yield run.cache[t.params.get("index", 0)].to(torch_dtype(t.dtype))


KERNELS: dict[str, Callable[[PlannedTensor, Any], Iterator[Any]]] = {
    "copy": copy, "lora_merge": lora_merge, "transform": transform}
