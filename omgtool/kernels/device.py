"""Where tensor work runs: `--device auto|cpu|cuda[:N]`.

`check_device` validates the spelling without importing torch (plans and --dry-run);
`resolve_device` asks torch what exists (execution).
"""

from __future__ import annotations

import re

from omgtool.errors import InvalidArgument

_SPELLING = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def check_device(device: str | None) -> str:
    dev = (device or "auto").strip().lower()
    if not _SPELLING.match(dev):
        raise InvalidArgument(f"--device must be auto, cpu or cuda[:N], not {device!r}")
    return dev


def resolve_device(device: str | None) -> str:
    """auto -> cuda when available, else cpu; cuda[:N] must exist."""
    import torch

    dev = check_device(device)
    if dev == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if dev.startswith("cuda"):
        if not torch.cuda.is_available():
            raise InvalidArgument(f"--device {device}: CUDA is not available on this machine")
        index = int(dev.split(":")[1]) if ":" in dev else 0
        if index >= torch.cuda.device_count():
            raise InvalidArgument(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return dev
