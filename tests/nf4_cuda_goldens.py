"""Write CUDA golden files for omgtool.kernels.nf4: bitsandbytes' own CUDA quantize_4bit on seeded
tensors. Needs a GPU and bitsandbytes; run on a GPU machine, then commit the folder:

    python -m tests.nf4_cuda_goldens --out tests/golden/nf4_cuda

tests/test_nf4_cuda_golden.py compares the CPU reimplementation with these files bit for bit
(it skips while the folder is absent). Each case stores its input, so no generator has to
agree across machines.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def cases() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(15)
    out = {
        "normal_fp16": (torch.randn(256, 320, generator=g) * 0.02).to(torch.float16),
        "normal_bf16": (torch.randn(256, 320, generator=g) * 0.02).to(torch.bfloat16),
        "heavy_fp16": (torch.distributions.StudentT(3.0).sample((192, 256)) * 0.01).to(torch.float16),
        "partial_odd_fp16": (torch.randn(37, 71, generator=g) * 0.05).to(torch.float16),  # 2627 elements
        "fp32": torch.randn(128, 192, generator=g) * 0.03,
    }
    z = (torch.randn(64, 128, generator=g) * 0.02).to(torch.float16)
    z[3:5] = 0  # whole zero blocks (rows of 128 = two blocks of 64)
    out["zero_blocks_fp16"] = z
    return out


def main() -> None:
    import bitsandbytes
    import bitsandbytes.functional as F

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "golden" / "nf4_cuda")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    meta = {"bitsandbytes": bitsandbytes.__version__, "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name(0), "cases": []}
    for name, x in cases().items():
        tensors[f"{name}.input"] = x.contiguous()
        for qt in ("nf4", "fp4"):
            for dq in (False, True):
                key = f"{name}.{qt}.{'dq' if dq else 'plain'}"
                q, st = F.quantize_4bit(x.cuda(), blocksize=64, quant_type=qt, compress_statistics=dq)
                tensors[f"{key}.packed"] = q.reshape(-1).cpu()
                tensors[f"{key}.absmax"] = st.absmax.reshape(-1).cpu()
                if dq:
                    tensors[f"{key}.absmax2"] = st.state2.absmax.reshape(-1).cpu()
                    tensors[f"{key}.offset"] = st.offset.reshape(1).cpu()
                tensors[f"{key}.dequant"] = F.dequantize_4bit(q, st).cpu().contiguous()
                meta["cases"].append(key)
    args.out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(args.out / "cases.safetensors"))
    (args.out / "cases.json").write_text(json.dumps(meta, indent=1))
    print(f"wrote {len(meta['cases'])} cases to {args.out}")


if __name__ == "__main__":
    main()
