"""omgtool.kernels.nf4 (on the CPU) against bitsandbytes' CUDA output stored as golden files.

The files come from `python -m tests.nf4_cuda_goldens` on a GPU machine; until one has been
lent they are absent and this test skips. What must hold: packed codes, absmax, second-level
absmax and dequantized weights bit for bit. The double-quant offset is a float32 mean whose
CUDA reduction order may differ from the CPU's by one ulp; the test then reports it and
compares the rest from the CUDA offset.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from omgtool.kernels import nf4

GOLDEN = Path(__file__).parent / "golden" / "nf4_cuda"


@pytest.fixture(scope="module")
def golden():
    if not (GOLDEN / "cases.safetensors").is_file():
        pytest.skip(f"no CUDA golden files in {GOLDEN}: run `python -m tests.nf4_cuda_goldens` on a GPU machine")
    from safetensors.torch import load_file

    return load_file(str(GOLDEN / "cases.safetensors")), json.loads((GOLDEN / "cases.json").read_text())


def test_cpu_reimplementation_matches_cuda(golden):
    t, meta = golden
    for key in meta["cases"]:
        name, qt, mode = key.split(".")
        x = t[f"{name}.input"]
        dq = mode == "dq"
        ours = nf4.quantize_4bit(x, 64, qt, double_quant=dq)
        assert torch.equal(ours.packed, t[f"{key}.packed"]), key
        if not dq:
            assert torch.equal(ours.absmax, t[f"{key}.absmax"]), key
            assert torch.equal(nf4.dequantize_4bit(ours), t[f"{key}.dequant"]), key
            continue
        offset = t[f"{key}.offset"][0]
        ulps = abs(int(ours.double.offset.view(torch.int32)) - int(offset.view(torch.int32)))
        assert ulps <= 1, f"{key}: offset differs by {ulps} ulp"
        # from the CUDA offset, the rest of the double quantization must be bit-exact
        absmax = nf4.block_absmax(x, 64)
        centred = absmax - offset
        absmax2 = nf4.block_absmax(centred, 256)
        assert torch.equal(absmax2, t[f"{key}.absmax2"]), key
        scaled = (nf4._padded_blocks(centred, 256) * torch.reciprocal(absmax2).unsqueeze(1)).reshape(-1)
        codes = nf4.quantize_dynamic(scaled[:centred.numel()], nf4.dynamic_map())
        assert torch.equal(codes, t[f"{key}.absmax"]), key
        state = nf4.QuantState(ours.packed, None, nf4.DoubleQuant(codes, absmax2, offset), tuple(x.shape), x.dtype,
                               64, qt)
        assert torch.equal(nf4.dequantize_4bit(state), t[f"{key}.dequant"]), key
