"""The QLoRA quantization settings (bitsandbytes Linear4bit parameters), without torch.

Planning (merge-lora --dry-run) checks and describes them; the numerics that use them are
omgtool.kernels.nf4 (which re-exports QuantSettings).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

QUANT_TYPES = ("nf4", "fp4")
BLOCKSIZES = (64, 128, 256, 512, 1024, 2048, 4096)  # the CUDA kernels' (32 is ROCm/CPU only)
DTYPE_NAMES = ("fp16", "bf16", "fp32")


def check_settings(blocksize: int, quant_type: str) -> None:
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant type must be nf4 or fp4, not {quant_type!r}")
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {', '.join(map(str, BLOCKSIZES))}, not {blocksize}")


@dataclass(frozen=True)
class QuantSettings:
    """How training held the base weights: bitsandbytes' Linear4bit with these parameters."""

    quant_type: str = "nf4"
    blocksize: int = 64
    double_quant: bool = True
    load_dtype: str = "fp16"  # from_pretrained(torch_dtype=...): the weight is cast to it, then quantized
    compute_dtype: str = "fp16"  # bnb_4bit_compute_dtype: the dequantized weight is cast to it

    def __post_init__(self):
        check_settings(self.blocksize, self.quant_type)
        for name in ("load_dtype", "compute_dtype"):
            if getattr(self, name) not in DTYPE_NAMES:
                raise ValueError(f"{name} must be one of {', '.join(DTYPE_NAMES)}, not {getattr(self, name)!r}")

    @property
    def load(self):
        import torch

        return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[self.load_dtype]

    @property
    def compute(self):
        import torch

        return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[self.compute_dtype]

    def as_params(self) -> dict[str, Any]:
        """Plain values, as a PlannedTensor's params carry them."""
        return asdict(self)
