"""The QLoRA hook of merge-lora and verify: each quantized base weight's bitsandbytes round trip.

merge-lora streams every weight in row blocks (omgtool.ops.merge._blocks). For a weight the
training held in 4-bit, `QuantHook.tensor` returns a `TensorTrip` that first makes one absmax
pass over the weight, then `apply(start, rows)` turns each block of original rows into the
rows training multiplied by (W_train, in the compute dtype) when the mode is nf4-dequant, and
passes them through unchanged when it is original. In both modes it measures the quantization
error q = W_train - W block by block, so the report can say ||q||/||W|| and ||q||/||Delta||.

verify --reference nf4 reads the base through `RoundTrippedCheckpoint`, a view of the base
checkpoint whose quantized tensors read as W_train.
"""

from __future__ import annotations

import math
from typing import Any

import torch


class TensorTrip:
    def __init__(self, hook: "QuantHook", name: str, source, key: str, shape: tuple[int, ...], rows: int,
                 device: str):
        from omgtool.kernels.nf4 import StreamedRoundTrip, aligned_rows

        self.hook, self.name = hook, name
        settings = hook.plan.settings
        cols = math.prod(shape[1:]) or 1
        self.rows = aligned_rows(rows, cols, settings.blocksize)

        # the pages read are released after each block's absmax, as the merge does per block
        self.trip = StreamedRoundTrip(lambda start, stop: source.read(key)[start:stop], shape, settings, self.rows,
                                      device, release=source.close)
        self.norms = [0.0, 0.0]  # ||q||^2, ||W||^2 (float32 per block, summed in float64)

    def apply(self, start: int, w: torch.Tensor) -> torch.Tensor:
        w_train = self.trip.rows(start, w, self.norms)
        return w_train if self.hook.plan.rounds_base else w

    def finish(self) -> None:
        self.hook.norms[self.name] = {"q_norm": math.sqrt(self.norms[0]), "w_norm": math.sqrt(self.norms[1])}


class QuantHook:
    """One merge's QLoRA state: the plan, and the norms measured per quantized tensor."""

    def __init__(self, plan):
        self.plan = plan
        self.quantized = set(plan.quantized)
        self.norms: dict[str, dict[str, float]] = {}

    def tensor(self, name: str, source, key: str, shape: tuple[int, ...], rows: int, device: str) -> TensorTrip | None:
        if name not in self.quantized or len(shape) != 2:
            return None
        return TensorTrip(self, name, source, key, shape, rows, device)

    def report(self, deltas: dict[str, dict[str, Any]]) -> dict[str, Any]:
        """The plan, and per quantized tensor ||q||/||W|| and, where it has a LoRA, ||q||/||Delta||."""
        stats = {}
        for name, n in self.norms.items():
            entry = {"q_over_w": n["q_norm"] / n["w_norm"] if n["w_norm"] else None, **n}
            delta = deltas.get(name, {}).get("frobenius_norm")
            if delta is not None:
                entry["delta_norm"] = delta
                entry["q_over_delta"] = n["q_norm"] / delta if delta else None
            stats[name] = entry
        ratios = [s["q_over_delta"] for s in stats.values() if s.get("q_over_delta") is not None]
        q_w = [s["q_over_w"] for s in stats.values() if s.get("q_over_w") is not None]
        summary = {"tensors": len(stats), "median_q_over_w": _median(q_w), "median_q_over_delta": _median(ratios),
                   "max_q_over_delta": max(ratios) if ratios else None}
        return {**self.plan.as_dict(), "summary": summary, "per_tensor": stats,
                "meaning": "q = W_train - W: the 4-bit round trip's error (fp32 Frobenius norms). ||q||/||Delta|| "
                           "near or above 1 means the quantization changed the weight as much as the LoRA did: "
                           "then the choice of --base-weights matters"}


def _median(values: list[float]) -> float | None:
    if not values:
        return None
    v = sorted(values)
    mid = len(v) // 2
    return v[mid] if len(v) % 2 else (v[mid - 1] + v[mid]) / 2


class RoundTrippedCheckpoint:
    """A checkpoint view whose quantized tensors read as their round trip, and are listed with
    the compute dtype (so a conversion keeps their values)."""

    def __init__(self, ckpt, names: list[str], settings):
        import dataclasses

        from omgtool.formats.dtypes import from_torch

        self._ckpt = ckpt
        self._names = {n for n in names if n in ckpt.tensors and len(ckpt.tensors[n].shape) == 2}
        self._settings = settings
        compute = from_torch(settings.compute)
        self.tensors = {n: dataclasses.replace(info, dtype=compute) if n in self._names else info
                        for n, info in ckpt.tensors.items()}

    def read(self, name: str):
        from omgtool.kernels.nf4 import roundtrip

        t = self._ckpt.read(name)
        return roundtrip(t, self._settings) if name in self._names else t

    def __getattr__(self, attr):
        return getattr(self._ckpt, attr)
