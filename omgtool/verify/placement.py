"""Where verify puts the models: the GPU budget, free memory, and when accelerate's device map
takes over (the placement policy; the models themselves are in omgtool.verify.models).

`run` arguments are the verify run's state: `gpu_budget` (bytes, None on the CPU) and
`transient` (the largest temporary a PEFT merge allocates).
"""

from __future__ import annotations

import resource

from omgtool.errors import InvalidArgument

GPU_BUDGET_RATIO = 2.4  # peak GPU memory target: at most this many times the bf16 LLM weights
GPU_MARGIN = 1 << 30  # activations, logits, vision trunk


def parse_max_memory(text: str | None) -> dict | None:
    """'0=20GiB,cpu=64GB' -> {0: bytes, 'cpu': bytes} (sizes as merge-lora's --max-shard-size)."""
    from omgtool.sizes import parse_size

    if not text:
        return None
    out: dict = {}
    for part in text.split(","):
        if not part.strip():
            continue
        if "=" not in part:
            raise InvalidArgument(f"--max-memory {text!r}: use DEVICE=SIZE pairs, e.g. 0=20GiB,cpu=64GB")
        key, size = (s.strip() for s in part.split("=", 1))
        dev: int | str = int(key) if key.isdigit() else key.lower()
        if isinstance(dev, str) and dev.startswith("cuda:") and dev[5:].isdigit():
            dev = int(dev[5:])
        if not isinstance(dev, int) and dev not in ("cpu", "disk", "mps"):
            raise InvalidArgument(f"--max-memory: unknown device {key!r} (use a GPU index, cpu)")
        out[dev] = parse_size(size)
    return out or None


def free_memory(device: str) -> int:
    import torch

    if device.startswith("cuda"):
        return int(torch.cuda.mem_get_info(torch.device(device))[0])
    import psutil

    return int(psutil.virtual_memory().available)


def peak_rss_bytes() -> int:
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def capped_placement(run, placement, need: int):
    """On a GPU without an explicit device map: the placement as given when `need` bytes of weights
    (+ PEFT's merge temporaries + activations) fit the GPU budget and the free memory; otherwise
    accelerate's device map with the GPU capped there and the rest on the CPU (streamed to the GPU
    layer by layer at each forward)."""
    import torch

    from omgtool.verify.models.llm import Placement

    if placement.device_map is not None or not placement.device.startswith("cuda"):
        return placement
    cap = min(run.gpu_budget or 1 << 62, int(free_memory(placement.device) * 0.95))
    cap -= run.transient + GPU_MARGIN
    if need <= cap:
        return placement
    idx = torch.device(placement.device).index or 0
    return Placement(placement.device, "auto", {idx: max(cap, 1 << 28), "cpu": int(free_memory("cpu") * 0.8)},
                     placement.offload_folder, scratch=placement.scratch)


def fp32_placement(run, placement, need: int):
    """Where the fp32 copy of the reference runs (bf16 mode's noise floor)."""
    if placement.device_map is not None and placement.device.startswith("cuda"):
        return placement
    return capped_placement(run, placement, need)


def param_bytes(analysis, adapter_ckpt, base_path) -> int:
    """bf16 bytes of base + LoRA (x2 gives the fp32 footprint)."""
    from omgtool.formats import open_checkpoint

    base = open_checkpoint(base_path)
    lora = sum(adapter_ckpt.tensors[k].numel for p in analysis.lora_pairs for k in (p.a_key, p.b_key))
    return 2 * (sum(t.numel for t in base.tensors.values()) + lora)
