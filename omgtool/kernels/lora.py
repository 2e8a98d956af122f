"""LoRA: what an adapter means (scale, per-module patterns, transposes) and its numerics.

Every caller asks this module; nobody recomputes alpha / r. PEFT (`tuners/lora/layer.py`):
scaling = lora_alpha / r, or lora_alpha / sqrt(r) with `use_rslora`; `alpha_pattern` /
`rank_pattern` override alpha / r per module (keys matched as `(.*\\.)?KEY$`); A is [r, in],
B is [out, r]; delta W = (B @ A) * scaling, transposed for an embedding LoRA and under
`fan_in_fan_out`. The merge is computed in float32 and rounded once to the output dtype:
cast(W.float() + scaling * B.float() @ A.float()).

The meaning half imports nothing heavy (plans and --dry-run use it); torch is imported by
the numerics only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

from omgtool.errors import InvalidArgument
from omgtool.kernels.bounded_regex import bounded_match

DEFAULT_CHUNK_ROWS = 8192
EMBEDDING_MARK = ".lora_embedding_"  # PEFT names an embedding LoRA's factors lora_embedding_{A,B}


# --- meaning -------------------------------------------------------------------------------

@dataclass(frozen=True)
class AdapterSettings:
    """The adapter_config.json entries that change a LoRA's numbers."""

    use_rslora: bool = False
    fan_in_fan_out: bool = False
    alpha_pattern: Mapping[str, float] = field(default_factory=dict)
    rank_pattern: Mapping[str, int] = field(default_factory=dict)
    use_dora: bool = False

    @classmethod
    def from_config(cls, cfg: Any) -> "AdapterSettings":
        if not isinstance(cfg, dict):
            return cls()
        return cls(use_rslora=bool(cfg.get("use_rslora")), fan_in_fan_out=bool(cfg.get("fan_in_fan_out")),
                   alpha_pattern=dict(cfg.get("alpha_pattern") or {}), rank_pattern=dict(cfg.get("rank_pattern") or {}),
                   use_dora=bool(cfg.get("use_dora")))



def scaling(alpha: float, rank: int, use_rslora: bool = False) -> float:
    """PEFT's scaling: alpha / r, or alpha / sqrt(r) for rsLoRA."""
    if rank <= 0:
        raise InvalidArgument(f"LoRA rank {rank}: a LoRA factor has no rows")
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


def _pattern_value(module_path: str, pattern: Mapping[str, Any]):
    for key, value in pattern.items():
        if bounded_match(rf"(.*\.)?{key}$", module_path):  # linear time: keys are user input
            return value
    return None


def module_alpha(module_path: str, alpha: float, settings: AdapterSettings, user_alpha: bool = False) -> float:
    """The alpha of one module: its `alpha_pattern` entry, unless the user gave --alpha."""
    if user_alpha:
        return alpha
    value = _pattern_value(module_path, settings.alpha_pattern)
    return float(value) if value is not None else alpha


def module_scale(module_path: str, alpha: float, rank: int, settings: AdapterSettings,
                 user_alpha: bool = False) -> tuple[float, float]:
    """(alpha, scaling) of one module, as PEFT computes them."""
    a = module_alpha(module_path, alpha, settings, user_alpha)
    return a, scaling(a, rank, settings.use_rslora)


def is_transposed(a_key: str, settings: AdapterSettings | None = None) -> bool:
    """delta = (B @ A).T: an embedding LoRA, or a Conv1D-style layer under fan_in_fan_out."""
    return EMBEDDING_MARK in a_key or bool(settings and settings.fan_in_fan_out)


def delta_shape(a_shape, b_shape, transposed: bool) -> tuple[int, int]:
    return (int(a_shape[1]), int(b_shape[0])) if transposed else (int(b_shape[0]), int(a_shape[1]))


# --- numerics ------------------------------------------------------------------------------

def check_pair(a, b, base_shape: tuple[int, ...] | None = None) -> int:
    """The rank; raises ValueError with the reason when A, B (and the base) do not fit."""
    if a.dim() != 2 or b.dim() != 2:
        raise ValueError(f"LoRA factors must be 2-D, got A {list(a.shape)} and B {list(b.shape)}")
    if a.shape[0] != b.shape[1]:
        raise ValueError(f"rank mismatch: A has {a.shape[0]} rows, B has {b.shape[1]} columns")
    if base_shape is not None and tuple(base_shape) != (b.shape[0], a.shape[1]):
        raise ValueError(f"B @ A is [{b.shape[0]}, {a.shape[1]}] but the base weight is {list(base_shape)}")
    return a.shape[0]


def oriented(a, b, transposed: bool):
    """(A', B') with B' @ A' = the delta's orientation: (B @ A).T = A.T @ B.T."""
    return (b.T, a.T) if transposed else (a, b)


def delta_weight(a, b, scale: float, transposed: bool = False):
    """scale * B @ A (transposed if asked) in float32 (no TF32, no reduced-precision reductions)."""
    a, b = oriented(a, b, transposed)
    with exact_matmul():
        return (b.float() @ a.float()) * scale


def merge_lora(weight, a, b, scale: float, out_dtype=None, chunk_rows: int = DEFAULT_CHUNK_ROWS,
               device="cpu"):
    """W + scale * B @ A, row chunk by row chunk, rounded once to `out_dtype` (on CPU).

    Peak extra memory is one float32 chunk of [chunk_rows, in] plus the factors.
    (A, B) are already oriented (`oriented`) so that B @ A has W's shape.
    """
    import torch

    check_pair(a, b, tuple(weight.shape))
    out_dtype = out_dtype or weight.dtype
    out = torch.empty(weight.shape, dtype=out_dtype)
    a32 = a.to(device=device, dtype=torch.float32)
    with exact_matmul():
        for start in range(0, weight.shape[0], chunk_rows):
            stop = min(start + chunk_rows, weight.shape[0])
            b32 = b[start:stop].to(device=device, dtype=torch.float32)
            w32 = weight[start:stop].to(device=device, dtype=torch.float32)
            w32.addmm_(b32, a32, alpha=scale)
            out[start:stop] = w32.to(out_dtype).cpu()
    return out


def delta_norm(a, b, scale: float) -> float:
    """||scale * B @ A||_F without forming B @ A: sqrt(sum((B^T B) * (A A^T))) * |scale|.

    Both Gram matrices are r x r; float64 keeps the identity accurate. (A transpose does not
    change the norm.)
    """
    a64 = a.double()
    b64 = b.double()
    gram = (b64.T @ b64) * (a64 @ a64.T)
    return float(gram.sum().clamp_min(0).sqrt()) * abs(scale)


class exact_matmul:
    """Disable TF32 and reduced-precision reductions for the duration (restored after)."""

    def __enter__(self):
        import torch

        self.saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
                      torch.get_float32_matmul_precision())
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        torch.set_float32_matmul_precision("highest")

    def __exit__(self, *exc):
        import torch

        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, precision = self.saved
        torch.set_float32_matmul_precision(precision)
