"""omgtool.kernels.nf4 against independent oracles that need no bitsandbytes: a literal scalar
transcription of the CUDA decision trees (csrc/kernels.cu dQuantizeNF4 / dQuantizeFP4), brute
force nearest-code search for the 8-bit map, float64 arithmetic for the dequantization formula."""

from __future__ import annotations

import math
import struct

import pytest
import torch

from omgtool.kernels import nf4


def f32(x: float) -> float:
    return struct.unpack("f", struct.pack("f", x))[0]


def cuda_nf4(x: float) -> int:
    """dQuantizeNF4, transcribed branch by branch (float32 literals)."""
    c = f32
    if x > c(0.03979014977812767):
        if x > c(0.3893125355243683):
            if x > c(0.6427869200706482):
                return 0b1111 if x > c(0.8614784181118011) else 0b1110
            return 0b1101 if x > c(0.5016634166240692) else 0b1100
        if x > c(0.2035212516784668):
            return 0b1011 if x > c(0.2920137718319893) else 0b1010
        return 0b1001 if x > c(0.1202552504837513) else 0b1000
    if x > c(-0.33967943489551544):
        if x > c(-0.13791173323988914):
            return 0b0111 if x > c(-0.045525018125772476) else 0b0110
        return 0b0101 if x > c(-0.23460740596055984) else 0b0100
    if x > c(-0.6106329262256622):
        return 0b0011 if x > c(-0.4599952697753906) else 0b0010
    return 0b0001 if x > c(-0.8480964004993439) else 0b0000


def cuda_fp4(x: float) -> int:
    """dQuantizeFP4, transcribed."""
    c = f32
    sign = 0b1000 if x < 0 else 0
    x = abs(x)
    if x > c(0.29166667):
        if x > c(0.583333):
            return (0b0011 if x > c(0.8333333) else 0b0010) + sign
        return (0b101 if x > c(0.4166667) else 0b100) + sign
    if x > c(0.0859375):
        return (0b0111 if x > c(0.20833333) else 0b0110) + sign
    return (0b0001 if x > c(0.00260417) else 0b0000) + sign


def adversarial() -> torch.Tensor:
    """Every threshold and its float32 neighbours, ±0, ±inf, NaN, and random values in [-1.2, 1.2]."""
    ts = list(nf4.NF4_THRESHOLDS) + list(nf4.FP4_THRESHOLDS) + [-t for t in nf4.FP4_THRESHOLDS]
    t = torch.tensor(ts, dtype=torch.float32)
    near = torch.cat([t, torch.nextafter(t, torch.tensor(2.0)), torch.nextafter(t, torch.tensor(-2.0))])
    special = torch.tensor([0.0, -0.0, 1.0, -1.0, math.inf, -math.inf, math.nan, 1e-30, -1e-30])
    g = torch.Generator().manual_seed(0)
    return torch.cat([near, special, torch.rand(20000, generator=g) * 2.4 - 1.2])


@pytest.mark.parametrize("quant_type,oracle", [("nf4", cuda_nf4), ("fp4", cuda_fp4)])
def test_codes_follow_the_cuda_trees(quant_type, oracle):
    x = adversarial()
    got = nf4.codes_of(x, quant_type).tolist()
    want = [oracle(v) for v in x.tolist()]
    assert got == want


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_lookup_path_equals_the_trees(quant_type):
    x = adversarial()
    tab = nf4.table(quant_type)
    want = tab[nf4.codes_of(x, quant_type).long()]
    got = nf4._table_values(x.clone(), quant_type)
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))  # bit-exact, sign of zero included


def test_ties_go_to_the_lower_code():
    for i, t in enumerate(nf4.NF4_THRESHOLDS):
        x = torch.tensor([f32(t)])
        assert nf4.codes_of(x, "nf4").item() == i  # not above threshold i: the code below it
        assert nf4.codes_of(torch.nextafter(x, torch.tensor(2.0)), "nf4").item() == i + 1


def test_nf4_thresholds_are_the_table_midpoints():
    tab = nf4.NF4_TABLE
    for i, t in enumerate(nf4.NF4_THRESHOLDS):
        assert t == pytest.approx((tab[i] + tab[i + 1]) / 2, abs=1e-7)


def test_packing_puts_the_first_element_in_the_high_nibble():
    codes = torch.tensor([1, 2, 3, 4, 5, 7], dtype=torch.uint8)
    packed = nf4.pack(codes, 5)
    assert packed.tolist() == [0x12, 0x34, 0x57]
    assert nf4.unpack(packed, 5).tolist() == [1, 2, 3, 4, 5]


def _oracle_dequant(x16: torch.Tensor, blocksize: int) -> torch.Tensor:
    """Blockwise NF4 by the textbook formula in float64 where exact, float32 where the kernel rounds."""
    flat = x16.reshape(-1).double()
    out = []
    tab = torch.tensor(nf4.NF4_TABLE, dtype=torch.float32).double()
    for s in range(0, flat.numel(), blocksize):
        blk = flat[s:s + blocksize]
        amax = blk.abs().max().float()  # exact
        recip = (1.0 / amax.double()).float()  # IEEE float32 reciprocal
        scaled = (blk * recip.double()).float()  # float32 product, one rounding (exact in float64 first)
        codes = torch.tensor([cuda_nf4(v) for v in scaled.tolist()])
        out.append((tab[codes] * amax.double()).float().to(x16.dtype))  # float32 product, then the load dtype
    return torch.cat(out).view(x16.shape)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_round_trip_matches_the_formula(dtype):
    g = torch.Generator().manual_seed(1)
    w = (torch.randn(6, 200, generator=g) * 0.05).to(dtype)  # 1200 elements: 18 full blocks + a partial one
    state = nf4.quantize_4bit(w, 64, "nf4")
    got = nf4.dequantize_4bit(state)
    assert got.dtype == dtype
    assert torch.equal(got, _oracle_dequant(w, 64))
    assert state.packed.numel() == (w.numel() + 1) // 2


def test_partial_last_block_uses_only_its_own_elements():
    w = torch.tensor([0.5] * 64 + [0.01, -0.02, 0.03], dtype=torch.float16)  # odd count, partial block
    state = nf4.quantize_4bit(w, 64, "nf4")
    assert state.absmax.tolist() == [0.5, pytest.approx(0.03, rel=1e-3)]
    assert state.packed.numel() == 34
    # the pad nibble: code of 0 * (1/absmax) = 0.0 -> 0b0111
    assert state.packed[-1].item() & 0x0F == 0b0111
    back = nf4.dequantize_4bit(state)
    assert back[-1].item() == pytest.approx(0.03, rel=1e-3)  # its own block's absmax, not the first block's


def test_all_zero_block_follows_cuda():
    """absmax 0 -> 1/0 = inf -> 0 * inf = NaN -> every `>` false -> code 0 (-1.0) -> -1.0 * 0 = -0.0."""
    w = torch.zeros(128, dtype=torch.float16)
    w[64:] = 0.25
    state = nf4.quantize_4bit(w, 64, "nf4")
    codes = nf4.unpack(state.packed, 128)
    assert codes[:64].tolist() == [0] * 64
    back = nf4.dequantize_4bit(state)
    assert torch.equal(back[:64], torch.zeros(64, dtype=torch.float16))
    assert bool(torch.signbit(back[:64]).all())
    assert nf4.roundtrip(w, nf4.QuantSettings()).isfinite().all()


def test_load_dtype_decides_the_codes():
    g = torch.Generator().manual_seed(2)
    w = (torch.randn(64, 128, generator=g) * 0.02).to(torch.bfloat16)
    s16 = nf4.QuantSettings(double_quant=False)
    assert torch.equal(nf4.roundtrip(w, s16), nf4.roundtrip(w.to(torch.float16), s16))  # codes from W.to(fp16)
    bf = nf4.roundtrip(w, nf4.QuantSettings(double_quant=False, load_dtype="bf16", compute_dtype="bf16"))
    assert bf.dtype == torch.bfloat16
    assert not torch.equal(bf.float(), nf4.roundtrip(w, s16).float())  # bf16 load rounds the output differently


def test_dynamic_map_search_is_the_nearest_code():
    code = nf4.dynamic_map()
    assert code.numel() == 256 and bool((code[1:] >= code[:-1]).all())
    assert 0.0 in code.tolist() and code.max().item() == 1.0
    g = torch.Generator().manual_seed(3)
    x = torch.cat([torch.rand(20000, generator=g) * 2 - 1, code, torch.tensor([-1.0, 1.0, 0.0])])
    got = nf4.quantize_dynamic(x, code).long()
    dist = (x.unsqueeze(1) - code).abs()
    best = dist.min(dim=1).values
    assert torch.equal(dist.gather(1, got.unsqueeze(1)).squeeze(1), best)


def _kernel_search(x: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """dQuantize<0> in csrc/kernels.cu, transcribed loop for loop (the oracle for the closed form)."""
    pivot = torch.full(x.shape, 127, dtype=torch.int64)
    upper_pivot = torch.full_like(pivot, 255)
    lower_pivot = torch.zeros_like(pivot)
    lower = torch.full(x.shape, -1.0)
    upper = torch.ones_like(lower)
    val = code[pivot]
    step = 64
    while step > 0:
        up = x > val
        lower_pivot = torch.where(up, pivot, lower_pivot)
        lower = torch.where(up, val, lower)
        upper_pivot = torch.where(up, upper_pivot, pivot)
        upper = torch.where(up, upper, val)
        pivot = pivot + torch.where(up, step, -step)
        val = code[pivot]
        step >>= 1
    upper = torch.where(upper_pivot == 255, code[255], upper)
    lower = torch.where(lower_pivot == 0, code[0], lower)
    up = x > val
    out = torch.where(up, torch.where(x > (upper + val) * 0.5, upper_pivot, pivot),
                      torch.where(x < (lower + val) * 0.5, lower_pivot, pivot))
    return out.to(torch.uint8)


def test_dynamic_search_closed_form_is_the_kernel_loop():
    code = nf4.dynamic_map()
    g = torch.Generator().manual_seed(5)
    mids = (code[1:] + code[:-1]) * 0.5
    special = torch.cat([code, mids, torch.tensor([0.0, -0.0, 1.0, -1.0, 1.5, -1.5, float("nan"),
                                                   float("inf"), -float("inf")])])
    up, down = torch.tensor(float("inf")), torch.tensor(-float("inf"))
    x = torch.cat([torch.rand(200000, generator=g) * 2 - 1, torch.randn(20000, generator=g) * 1e-4,
                   special, torch.nextafter(special, up), torch.nextafter(special, down)])
    assert torch.equal(nf4.quantize_dynamic(x, code), _kernel_search(x, code))


def test_double_quant_state():
    g = torch.Generator().manual_seed(4)
    w = (torch.randn(300, 256, generator=g) * 0.03).to(torch.float16)
    state = nf4.quantize_4bit(w, 64, "nf4", double_quant=True)
    absmax = nf4.block_absmax(w, 64)
    dq = state.double
    assert dq.offset.item() == pytest.approx(float(absmax.double().mean()), rel=1e-6)
    assert dq.absmax2.numel() == math.ceil(absmax.numel() / 256)
    # absmax' approximates absmax to the 8-bit map's precision
    assert float(((dq.dequantize() - absmax).abs() / absmax).max()) < 0.02
    assert torch.equal(nf4.dequantize_4bit(state), nf4.roundtrip(w, nf4.QuantSettings()))


def test_streamed_round_trip_equals_whole_tensor():
    g = torch.Generator().manual_seed(5)
    w = (torch.randn(1000, 96, generator=g) * 0.02).to(torch.bfloat16)  # 96 cols: blocks straddle rows
    s = nf4.QuantSettings()
    rows = nf4.aligned_rows(100, 96, 64)
    assert (rows * 96) % 64 == 0
    trip = nf4.StreamedRoundTrip(lambda a, b: w[a:b], w.shape, s, rows)
    got = torch.cat([trip.rows(a, w[a:a + rows]) for a in range(0, 1000, rows)])
    assert torch.equal(got, nf4.roundtrip(w, s))


def test_settings_are_checked():
    with pytest.raises(ValueError):
        nf4.QuantSettings(blocksize=100)
    with pytest.raises(ValueError):
        nf4.QuantSettings(quant_type="int4")
    with pytest.raises(ValueError):
        nf4.QuantSettings(load_dtype="fp8")


def test_the_few_codes_path_is_the_tree():
    """The lookup's fix-up (bucketize for NF4) on the values that reach it: thresholds, their
    neighbours, signalling-style NaNs beside infinity (their bucket holds inf too), zeros."""
    th = torch.tensor(nf4.NF4_THRESHOLDS, dtype=torch.float32)
    nans = torch.tensor([0x7F800001, 0x7F80FFFF, 0xFF800001 - (1 << 32), 0x7FC00000], dtype=torch.int32)
    x = torch.cat([th, torch.nextafter(th, torch.tensor(2.0)), torch.nextafter(th, torch.tensor(-2.0)),
                   nans.view(torch.float32), torch.tensor([0.0, -0.0, 1.0, -1.0, float("inf"), -float("inf")]),
                   torch.rand(5000, generator=torch.Generator().manual_seed(9)) * 2 - 1])
    for quant_type in ("nf4", "fp4"):
        assert torch.equal(nf4._few_codes(x, quant_type), nf4.codes_of(x, quant_type)), quant_type
    assert torch.equal(nf4._table_values(x.clone(), "nf4").view(torch.int32),
                       nf4.table("nf4")[nf4.codes_of(x, "nf4").long()].view(torch.int32))
