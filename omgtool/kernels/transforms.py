"""Named tensor transforms that conversion mappings refer to (omgtool.arch.convert matches the rules).

Transforms act on rows (dim 0), so the same rule applies to a weight and to the B
factor of a LoRA on it; the A factor is shared by every piece of a split.
"""

from __future__ import annotations

from typing import Callable

from omgtool.errors import InvalidArgument


def grouped_qkv_rows(num_heads: int, num_kv_heads: int, head_dim: int):
    """Row indices of q, k, v inside InternLM2's fused wqkv.

    Rows are [num_kv_heads][g + 2][head_dim], g = num_heads // num_kv_heads: in kv group h,
    slots 0..g-1 are query heads h*g .. h*g+g-1, slot g the key head h, slot g+1 the value head h.
    """
    import torch

    if num_heads % num_kv_heads:
        raise InvalidArgument(f"{num_heads} heads do not divide into {num_kv_heads} kv heads")
    g = num_heads // num_kv_heads
    rows = torch.arange(num_kv_heads * (g + 2) * head_dim).view(num_kv_heads, g + 2, head_dim)
    q = rows[:, :g].reshape(-1)
    k = rows[:, g].reshape(-1)
    v = rows[:, g + 1].reshape(-1)
    return q, k, v


def split_grouped_qkv(t, *, num_heads: int, num_kv_heads: int, head_dim: int, **_):
    expected = (num_heads + 2 * num_kv_heads) * head_dim
    if t.shape[0] != expected:
        raise InvalidArgument(f"wqkv has {t.shape[0]} rows, expected (heads {num_heads} + 2 x kv "
                              f"{num_kv_heads}) x head_dim {head_dim} = {expected}")
    return [t.index_select(0, idx) for idx in grouped_qkv_rows(num_heads, num_kv_heads, head_dim)]


def split_grouped_qkv_shapes(shape: tuple[int, ...], *, num_heads: int, num_kv_heads: int, head_dim: int,
                             **_) -> list[tuple[int, ...]]:
    return [(num_heads * head_dim, *shape[1:]), (num_kv_heads * head_dim, *shape[1:]),
            (num_kv_heads * head_dim, *shape[1:])]


def identity(t, **_):
    return [t]


# name -> (tensor, **params) -> pieces, and name -> (shape, **params) -> piece shapes (no torch:
# plans use the shapes). Conversion mappings name transforms; register_transform adds one.
TRANSFORMS: dict[str, Callable] = {}
SHAPES: dict[str, Callable] = {}


def register_transform(name: str, apply_fn: Callable, shapes_fn: Callable) -> None:
    TRANSFORMS[name] = apply_fn
    SHAPES[name] = shapes_fn


register_transform("identity", identity, lambda shape, **_: [tuple(shape)])
register_transform("split_grouped_qkv", split_grouped_qkv, split_grouped_qkv_shapes)

# A base weight's step before a merge (or a copy), named by a PlannedTensor's
# params["base_transform"]: factory(read, shape, params, rows, device, release) -> step, where
# read(start, stop) gives rows of the original weight, release() drops the pages read so far,
# step.rows is the row block size the kernel must then use, step(start, rows) -> the rows to use
# instead, and step.record() -> a dict the kernel keeps in run.records[WEIGHT_TRANSFORM_RECORDS[name]][tensor].
WEIGHT_TRANSFORMS: dict[str, Callable] = {}
WEIGHT_TRANSFORM_RECORDS: dict[str, str] = {}


def register_weight_transform(name: str, factory: Callable, record: str) -> None:
    WEIGHT_TRANSFORMS[name] = factory
    WEIGHT_TRANSFORM_RECORDS[name] = record


def _nf4_step(replace: bool) -> Callable:
    def make(read, shape, params, rows, device="cpu", release=None):
        from omgtool.kernels.nf4 import WeightTrip

        return WeightTrip(read, shape, params, rows, device, release, replace=replace)

    return make


# QLoRA (merge-lora --base-weights): the bitsandbytes 4-bit round trip of the weight
# (nf4_roundtrip), or the original weight with the round trip's error measured (nf4_measure)
register_weight_transform("nf4_roundtrip", _nf4_step(True), "qlora")
register_weight_transform("nf4_measure", _nf4_step(False), "qlora")


def transform_shapes(transform: str, shape: tuple[int, ...], params: dict) -> list[tuple[int, ...]]:
    if transform not in SHAPES:
        raise InvalidArgument(f"unknown transform {transform!r}")
    return [tuple(int(d) for d in s) for s in SHAPES[transform](tuple(shape), **params)]


def apply(transform: str, tensor, params: dict) -> list:
    return TRANSFORMS[transform](tensor, **params)
