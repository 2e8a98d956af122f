"""The QLoRA side of merge-lora and verify: the report of each quantized base weight's
bitsandbytes round trip, and the base view verify reads through.

merge-lora's planner (omgtool.ops.merge._plan_qlora) names a weight step on every quantized
weight's PlannedTensor (params["base_transform"]: nf4_roundtrip with --base-weights
nf4-dequant, nf4_measure with original; omgtool.kernels.transforms.WEIGHT_TRANSFORMS). The
plan's kernels stream it block by block and keep ||q|| and ||W|| per tensor in
run.records["qlora"] (q = W_train - W); `qlora_report` turns those and the LoRA delta norms
into the `qlora` section of omgtool-merge.json.

verify --reference nf4 reads the base through `RoundTrippedCheckpoint`, a view of the base
checkpoint whose quantized tensors read as W_train.
"""

from __future__ import annotations

from typing import Any

MEANING = ("q = W_train - W: the 4-bit round trip's error (fp32 Frobenius norms). ||q||/||Delta|| near or above 1 "
           "means the quantization changed the weight as much as the LoRA did: then the choice of --base-weights "
           "matters")


def qlora_report(plan, norms: dict[str, dict[str, float]], deltas: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """`plan` (omgtool.arch.qlora.QloraPlan), and per quantized tensor ||q||/||W|| and, where it
    has a LoRA, ||q||/||Delta||, with medians."""
    stats = {}
    for name, n in norms.items():
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
    return {**plan.as_dict(), "summary": summary, "per_tensor": stats, "meaning": MEANING}


def qlora_numerics(plan) -> str:
    """What the report's `numerics` adds for the QLoRA mode."""
    if not plan.rounds_base:
        return "; --base-weights original: W is the original weight (the 4-bit round trip is measured, not used)"
    s = plan.settings
    return (f"; --base-weights nf4-dequant: W is each quantized weight's bitsandbytes round trip "
            f"cast_{s.compute_dtype}(cast_{s.load_dtype}({s.quant_type.upper()}[code] * absmax')) from codes of "
            f"W.to({s.load_dtype}), blocksize {s.blocksize}, double quant {'on' if s.double_quant else 'off'}")


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
