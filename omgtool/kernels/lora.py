"""LoRA numerics: one delta formula, a chunked merge, and the update strength.

PEFT (`tuners/lora/layer.py`): scaling = lora_alpha / r; A is [r, in], B is [out, r];
delta W = (B @ A) * scaling. Here the merge is computed in float32 and rounded once
to the output dtype: cast(W.float() + scaling * B.float() @ A.float()).
"""

from __future__ import annotations

import torch

DEFAULT_CHUNK_ROWS = 8192


def check_pair(a: torch.Tensor, b: torch.Tensor, base_shape: tuple[int, ...] | None = None) -> int:
    """The rank; raises ValueError with the reason when A, B (and the base) do not fit."""
    if a.dim() != 2 or b.dim() != 2:
        raise ValueError(f"LoRA factors must be 2-D, got A {list(a.shape)} and B {list(b.shape)}")
    if a.shape[0] != b.shape[1]:
        raise ValueError(f"rank mismatch: A has {a.shape[0]} rows, B has {b.shape[1]} columns")
    if base_shape is not None and tuple(base_shape) != (b.shape[0], a.shape[1]):
        raise ValueError(f"B @ A is [{b.shape[0]}, {a.shape[1]}] but the base weight is {list(base_shape)}")
    return a.shape[0]


def delta_weight(a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """scale * B @ A in float32 (no TF32, no reduced-precision reductions)."""
    with _exact_matmul():
        return (b.float() @ a.float()) * scale


def merge_lora(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float,
               out_dtype: torch.dtype | None = None, chunk_rows: int = DEFAULT_CHUNK_ROWS,
               device: str | torch.device = "cpu") -> torch.Tensor:
    """W + scale * B @ A, row chunk by row chunk, rounded once to `out_dtype` (on CPU).

    Peak extra memory is one float32 chunk of [chunk_rows, in] plus the factors.
    `weight` may have fewer rows than B (it is then extended by the caller first).
    """
    check_pair(a, b, tuple(weight.shape))
    out_dtype = out_dtype or weight.dtype
    out = torch.empty(weight.shape, dtype=out_dtype)
    a32 = a.to(device=device, dtype=torch.float32)
    with _exact_matmul():
        for start in range(0, weight.shape[0], chunk_rows):
            stop = min(start + chunk_rows, weight.shape[0])
            b32 = b[start:stop].to(device=device, dtype=torch.float32)
            w32 = weight[start:stop].to(device=device, dtype=torch.float32)
            w32.addmm_(b32, a32, alpha=scale)
            out[start:stop] = w32.to(out_dtype).cpu()
    return out


def delta_norm(a: torch.Tensor, b: torch.Tensor, scale: float) -> float:
    """||scale * B @ A||_F without forming B @ A: sqrt(sum((B^T B) * (A A^T))) * |scale|.

    Both Gram matrices are r x r; float64 keeps the identity accurate.
    """
    a64 = a.double()
    b64 = b.double()
    gram = (b64.T @ b64) * (a64 @ a64.T)
    return float(gram.sum().clamp_min(0).sqrt()) * abs(scale)


class _exact_matmul:
    """Disable TF32 and reduced-precision reductions for the duration (restored after)."""

    def __enter__(self):
        self.saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
                      torch.get_float32_matmul_precision())
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        torch.set_float32_matmul_precision("highest")

    def __exit__(self, *exc):
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, precision = self.saved
        torch.set_float32_matmul_precision(precision)
