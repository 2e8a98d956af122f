"""omgtool.kernels.nf4 against bitsandbytes itself (CPU backend), a test-only oracle.

bitsandbytes is optional (`pip install -e '.[qlora-oracle]'`); without it these tests skip.
Its CPU backend is not the CUDA algorithm everywhere, so the comparisons say where they must
agree bit for bit and where, by how much, they may not:
- NF4 codes, absmax, dequantized weights without double quantization: bit-exact;
- dequantization of bitsandbytes' own quant state (with double quantization): bit-exact;
- double quantization: offset and second-level absmax bit-exact; the 8-bit scale codes differ
  in <= 0.5% of blocks, where ours is always the nearer code (CUDA's dQuantize is nearest);
- FP4: the CPU backend bucketizes on computed midpoints and maps signed zeros its own way,
  so codes may differ only at a CUDA threshold tie or for values rounding to a signed zero.
"""

from __future__ import annotations

import pytest
import torch

from omgtool.kernels import nf4

bnb_functional = pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes is not installed "
                                     "(test extra qlora-oracle); the oracle comparisons are skipped")
F = bnb_functional


def weights(dtype, seed=0, shape=(512, 448)):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * 0.02).to(dtype)


def test_tables_and_maps_are_bitsandbytes():
    assert torch.equal(F.get_4bit_type("nf4", device="cpu"), nf4.table("nf4"))
    assert torch.equal(F.get_4bit_type("fp4", device="cpu").abs(), nf4.table("fp4").abs())
    assert torch.equal(F.create_dynamic_map(), nf4.dynamic_map())


def test_nf4_thresholds_are_bitsandbytes_midpoints():
    from bitsandbytes.backends.default.ops import _get_4bit_quantize_bounds

    bounds, _ = _get_4bit_quantize_bounds("nf4", torch.device("cpu"))
    assert torch.equal(bounds, torch.tensor(nf4.NF4_THRESHOLDS, dtype=torch.float32))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_nf4_codes_and_dequant_bit_exact(dtype):
    w = weights(dtype, 1)
    q, state = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=False)
    ours = nf4.quantize_4bit(w, 64, "nf4")
    assert torch.equal(state.absmax, ours.absmax)
    assert torch.equal(q.reshape(-1), ours.packed)
    back = F.dequantize_4bit(q, state)
    assert torch.equal(back, nf4.dequantize_4bit(ours))
    s = nf4.QuantSettings(double_quant=False, load_dtype={torch.float16: "fp16", torch.bfloat16: "bf16",
                                                          torch.float32: "fp32"}[dtype])
    s = nf4.QuantSettings(**{**s.__dict__, "compute_dtype": s.load_dtype})
    assert torch.equal(nf4.roundtrip(w, s), back)


def test_dequantize_bitsandbytes_state_bit_exact():
    w = weights(torch.float16, 2)
    q, state = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    dq = nf4.DoubleQuant(state.absmax, state.state2.absmax, state.offset)
    ours = nf4.decode(nf4.unpack(q.reshape(-1), w.numel()), dq.dequantize(), 64, "nf4", torch.float16)
    assert torch.equal(ours.view(w.shape), F.dequantize_4bit(q, state))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_double_quant_offset_absmax2_and_scale_codes(dtype):
    w = weights(dtype, 3, (2048, 1024))  # 32768 blocks -> 128 second-level blocks
    q, state = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    ours = nf4.quantize_4bit(w, 64, "nf4", double_quant=True).double
    assert torch.equal(state.offset, ours.offset)
    assert torch.equal(state.state2.absmax, ours.absmax2)
    differ = state.absmax != ours.codes
    assert float(differ.float().mean()) <= 0.005
    # where they differ ours is the strictly nearer code of the dynamic map
    absmax = nf4.block_absmax(w, 64)
    centred = absmax - ours.offset
    scaled = (nf4._padded_blocks(centred, 256) * torch.reciprocal(ours.absmax2).unsqueeze(1)).reshape(-1)
    scaled = scaled[:centred.numel()]
    code = nf4.dynamic_map()
    ours_d = (code[ours.codes.long()] - scaled).abs()
    theirs_d = (code[state.absmax.long()] - scaled).abs()
    assert bool((ours_d <= theirs_d).all())
    assert bool((ours_d[differ] < theirs_d[differ]).all())


def test_fp4_differs_only_at_ties_and_signed_zeros():
    w = weights(torch.float32, 4)
    q, state = F.quantize_4bit(w, blocksize=64, quant_type="fp4", compress_statistics=False)
    ours = nf4.quantize_4bit(w, 64, "fp4")
    assert torch.equal(state.absmax, ours.absmax)
    a, b = nf4.unpack(q.reshape(-1), w.numel()), nf4.unpack(ours.packed, w.numel())
    scaled = nf4._scaled(w, ours.absmax, 64)[:w.numel()]
    differ = a != b
    tie = torch.zeros_like(differ)
    for t in nf4.FP4_THRESHOLDS:
        tie |= (scaled.abs() - t).abs() < 1e-6
    signed_zero = (a & 7 == 0) & (b & 7 == 0)
    assert bool((tie | signed_zero)[differ].all())
    assert float(differ.float().mean()) < 0.01
