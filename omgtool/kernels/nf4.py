"""bitsandbytes' 4-bit (NF4/FP4) blockwise quantization, reimplemented in plain torch.

This is the algorithm of bitsandbytes' CUDA kernels (`csrc/kernels.cu`: kQuantizeBlockwise,
kDequantizeBlockwise, dQuantizeNF4/dQuantizeFP4, dQuantize; `functional.py`: quantize_4bit,
dequantize_4bit, create_dynamic_map), the one a QLoRA training run computed with:

- blocks of `blocksize` consecutive elements of the flattened tensor (the last one partial,
  padded with zeros); absmax = max |x| per block in float32;
- scale by the reciprocal: x * (1 / absmax), float32;
- 4-bit code by the kernel's decision tree with strict `>` at fixed float32 thresholds (a tie
  goes to the lower code; NaN, as from an all-zero block's 0 * inf, takes every "else" branch);
- two codes per byte, the first element in the high nibble;
- double quantization (compress_statistics): offset = float32 mean of absmax, then absmax -
  offset quantized blockwise (256) to 8 bits with the signed dynamic map and the kernel's
  binary search + midpoint rule;
- dequantization: table[code] * absmax' in float32, rounded once to the load dtype, where
  absmax' = dynamic[q] * absmax2 + offset with double quantization.

bitsandbytes is not imported: its CPU backend differs from the CUDA kernels (bucketize on
computed midpoints, a non-nearest 8-bit scale code for some blocks, eval()-mode repacking).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

import torch

from omgtool.kernels.nf4_settings import QuantSettings, check_settings

NF4_TABLE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
)
# dQuantizeNF4's tree, flattened: code = number of thresholds x exceeds (strict >).
NF4_THRESHOLDS = (
    -0.8480964004993439, -0.6106329262256622, -0.4599952697753906, -0.33967943489551544,
    -0.23460740596055984, -0.13791173323988914, -0.045525018125772476, 0.03979014977812767,
    0.1202552504837513, 0.2035212516784668, 0.2920137718319893, 0.3893125355243683,
    0.5016634166240692, 0.6427869200706482, 0.8614784181118011,
)
# FP4 (sign bit + 3 bits): dDequantizeFP4Tree's magnitudes by the low 3 bits.
FP4_MAGNITUDES = (0.0, 5.208333333e-03, 0.66666667, 1.0, 0.33333333, 0.5, 0.16666667, 0.25)
# dQuantizeFP4's tree on |x|: the k-th threshold exceeded gives FP4_ORDER[k].
FP4_THRESHOLDS = (0.00260417, 0.0859375, 0.20833333, 0.29166667, 0.4166667, 0.583333, 0.8333333)
FP4_ORDER = (0b000, 0b001, 0b110, 0b111, 0b100, 0b101, 0b010, 0b011)
DQ_BLOCKSIZE = 256  # functional.quantize_4bit: quantize_blockwise(absmax - offset, blocksize=256)
SUB_ELEMENTS = 1 << 18  # elements per step of the element-wise kernels: their temporaries stay in cache


class _one_thread:
    """torch on one intra-op thread for a run of small ops (threads would only wait on each other)."""

    def __enter__(self):
        self.saved = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        torch.set_num_threads(self.saved)


def _f32(values, device=None) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, device=device)


def table(quant_type: str, device=None) -> torch.Tensor:
    """The 16 dequantization values by code, float32."""
    if quant_type == "nf4":
        return _f32(NF4_TABLE, device)
    if quant_type == "fp4":
        mags = list(FP4_MAGNITUDES)
        return _f32(mags + [-m for m in mags], device)
    raise ValueError(f"quant type must be nf4 or fp4, not {quant_type!r}")


def dynamic_map(device=None) -> torch.Tensor:
    """bitsandbytes' create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8), sorted."""
    data: list[float] = []
    max_exp, non_sign = 7, 7
    for i in range(max_exp):
        items = int(2 ** (i + non_sign - max_exp) + 1)
        boundaries = torch.linspace(0.1, 1, items, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-(max_exp - 1) + i)) * means).tolist()
        data += (-(10 ** (-(max_exp - 1) + i)) * means).tolist()
    data += [0, 1.0]
    data.sort()
    return torch.tensor(data, dtype=torch.float32, device=device)


# --- the kernels, vectorised -----------------------------------------------------------------

def _padded_blocks(x: torch.Tensor, blocksize: int) -> torch.Tensor:
    """Flattened x as [blocks, blocksize] (its own dtype), the last block padded with zeros
    (CUDA's BlockLoad default)."""
    flat = x.reshape(-1)
    pad = -flat.numel() % blocksize
    if pad:
        flat = torch.nn.functional.pad(flat, (0, pad))
    return flat.view(-1, blocksize)


def block_absmax(x: torch.Tensor, blocksize: int) -> torch.Tensor:
    """max |x| per block of the flattened tensor, float32 (exact: widening, abs and max do not
    round; torch's fp16/bf16 reductions on the CPU are several times slower than float32's)."""
    blocks = _padded_blocks(x, blocksize)
    out = torch.empty(blocks.shape[0], dtype=torch.float32, device=blocks.device)
    if blocks.device.type != "cpu":
        return torch.amax(blocks.abs().float(), dim=1, out=out)
    # on the CPU: one intra-op thread (in a merge the writer and hasher threads hold cores, and
    # threads meeting at each small op's barrier made this pass 100x slower), in steps whose
    # float32 temporaries stay in cache
    step = max(1, SUB_ELEMENTS // blocksize)
    with _one_thread():
        for start in range(0, blocks.shape[0], step):
            widened = blocks[start:start + step].to(torch.float32, copy=True)  # never the input itself
            torch.amax(widened.abs_(), dim=1, out=out[start:start + step])
    return out


def _scaled(x: torch.Tensor, absmax: torch.Tensor, blocksize: int) -> torch.Tensor:
    """x * (1 / absmax) per block in float32, flat, padding included (the product promotes x
    to float32 exactly, in the same pass)."""
    blocks = _padded_blocks(x, blocksize)
    recip = torch.reciprocal(absmax.to(device=blocks.device, dtype=torch.float32)).unsqueeze(1)
    return torch.mul(blocks, recip).reshape(-1)


def codes_of(scaled: torch.Tensor, quant_type: str) -> torch.Tensor:
    """The kernels' decision trees on float32 values, as uint8 codes. A tree with strict `>`
    over sorted thresholds gives the number of thresholds exceeded; NaN exceeds none."""
    if quant_type == "nf4":
        codes = torch.zeros(scaled.shape, dtype=torch.uint8, device=scaled.device)
        for t in _f32(NF4_THRESHOLDS).tolist():
            codes.add_(scaled > t)
        return codes
    if quant_type == "fp4":
        mag = scaled.abs()
        k = torch.zeros(scaled.shape, dtype=torch.uint8, device=scaled.device)
        for t in _f32(FP4_THRESHOLDS).tolist():
            k.add_(mag > t)
        order = torch.tensor(FP4_ORDER, dtype=torch.uint8, device=scaled.device)
        return order[k.long()] | ((scaled < 0).to(torch.uint8) << 3)
    raise ValueError(f"quant type must be nf4 or fp4, not {quant_type!r}")


def encode(x: torch.Tensor, absmax: torch.Tensor, blocksize: int, quant_type: str) -> torch.Tensor:
    """One 4-bit code per element (uint8, unpacked) of the flattened x, padding included
    (the last block's zeros), from its blocks' absmax."""
    return codes_of(_scaled(x, absmax, blocksize), quant_type)


AMBIGUOUS = 2.0  # not a table value: marks a LUT bucket a threshold falls into
_AMBIGUOUS_BITS = 0x40000000  # 2.0 as float32 bits


@lru_cache(maxsize=4)
def _value_lut(quant_type: str) -> torch.Tensor:
    """table[code] for every float32 by its top 16 bits (sign, exponent, 7 mantissa bits).
    Each bucket is a contiguous range of one sign, on which the trees' codes are monotone:
    where both ends get the same code, every value between does; else AMBIGUOUS."""
    top = torch.arange(1 << 16, dtype=torch.int32)
    low_end = (top << 16).view(torch.float32)
    high_end = ((top << 16) | 0xFFFF).view(torch.float32)
    with _one_thread():
        codes, other = codes_of(low_end, quant_type), codes_of(high_end, quant_type)
    values = table(quant_type)[codes.long()]
    values[codes != other] = AMBIGUOUS
    return values


def _table_values(scaled: torch.Tensor, quant_type: str) -> torch.Tensor:
    """table[codes_of(scaled)] (float32) by a 64K-entry lookup, the few values in buckets a
    threshold splits resolved by the trees themselves."""
    lut = _value_lut(quant_type).to(scaled.device)
    values = lut.index_select(0, (scaled.view(torch.int32) >> 16) & 0xFFFF)
    # the marker compared as bits: the float compare against a scalar is the slower CPU kernel
    unsure = (values.view(torch.int32) == _AMBIGUOUS_BITS).nonzero().squeeze(1)
    if unsure.numel():
        exact = _few_codes(scaled.index_select(0, unsure), quant_type)
        values[unsure] = table(quant_type, scaled.device)[exact.long()]
    return values


def _few_codes(x: torch.Tensor, quant_type: str) -> torch.Tensor:
    """codes_of for a few values: for NF4 one bucketize (the count of thresholds x strictly
    exceeds, as the tree's `>`; NaN, which bucketize sorts last, exceeds none) instead of 30
    small ops."""
    if quant_type != "nf4":
        return codes_of(x, quant_type)
    codes = torch.bucketize(x, _f32(NF4_THRESHOLDS, x.device), right=False)
    return torch.where(torch.isnan(x), 0, codes).to(torch.uint8)


def pack(codes: torch.Tensor, numel: int) -> torch.Tensor:
    """Two codes per byte, the first in the high nibble; (numel + 1) // 2 bytes. For odd numel
    the last low nibble is the next code (encode's padding: the code of 0), else 0."""
    c = codes[:numel + (numel % 2)]
    if c.numel() % 2:
        c = torch.nn.functional.pad(c, (0, 1))
    return (c[0::2] << 4) | c[1::2]


def unpack(packed: torch.Tensor, numel: int) -> torch.Tensor:
    out = torch.stack([packed >> 4, packed & 0x0F], dim=1).reshape(-1)
    return out[:numel]


def decode(codes: torch.Tensor, absmax: torch.Tensor, blocksize: int, quant_type: str,
           dtype: torch.dtype) -> torch.Tensor:
    """table[code] * absmax (float32), rounded once to `dtype`; flat, len(codes) elements."""
    n = codes.numel()
    vals = table(quant_type, codes.device)[codes.long()]
    pad = -n % blocksize
    if pad:
        vals = torch.nn.functional.pad(vals, (0, pad))
    vals = vals.view(-1, blocksize) * absmax.to(vals.device).unsqueeze(1)
    return vals.reshape(-1)[:n].to(dtype)


def quantize_dynamic(x: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """dQuantize<0>: the kernel's 7-step binary search over the sorted 256-value map (from
    pivot 127, steps 64..1, up when `x > code[pivot]`), then its midpoint rule, in closed form.

    The search is over a complete binary tree in in-order: odd indices 1..253 inner nodes,
    even 0..254 leaves. With c = #{i < 255: code[i] < x}, it ends on the leaf next to the gap
    c falls in, its other neighbour being the inner node it last turned at, so:
    c odd (leaf c-1, x above it): c if x > (code[c] + code[c-1]) * 0.5 else c-1 (c = 255
    included: the upper end is code[255]); c even, c >= 2 (leaf c, x at or below it): c-1 if
    x < (code[c-1] + code[c]) * 0.5 else c; c = 0 and NaN (every comparison false): 0.
    tests/test_nf4.py checks this against the loop transcribed from the kernel."""
    code = code.to(x.device)
    c = torch.searchsorted(code[:255], x, side="left")  # strict: code[i] < x; NaN sorts last
    hi = code.index_select(0, c.clamp(max=255))
    lo = code.index_select(0, (c - 1).clamp(min=0))
    mid = (hi + lo) * 0.5
    odd = (c & 1).bool()
    out = torch.where(odd, torch.where(x > mid, c, c - 1), torch.where(x < mid, c - 1, c))
    out = torch.where((c == 0) | torch.isnan(x), 0, out)
    return out.to(torch.uint8)


@dataclass
class DoubleQuant:
    """The 8-bit quantized absmax: one code per 4-bit block, absmax2 per 256 codes, the offset."""

    codes: torch.Tensor  # uint8
    absmax2: torch.Tensor  # float32
    offset: torch.Tensor  # float32, 0-d
    blocksize: int = DQ_BLOCKSIZE

    def dequantize(self) -> torch.Tensor:
        """dequantize_blockwise (dynamic[q] * absmax2, float32) + offset: the absmax the 4-bit
        dequantization multiplies by."""
        vals = dynamic_map(self.codes.device)[self.codes.long()]
        n = vals.numel()
        pad = -n % self.blocksize
        if pad:
            vals = torch.nn.functional.pad(vals, (0, pad))
        vals = (vals.view(-1, self.blocksize) * self.absmax2.to(vals.device).unsqueeze(1)).reshape(-1)[:n]
        return vals + self.offset.to(vals.device)


def double_quantize(absmax: torch.Tensor, blocksize: int = DQ_BLOCKSIZE) -> DoubleQuant:
    """functional.quantize_4bit(compress_statistics=True): offset = absmax.mean(), then
    quantize_blockwise(absmax - offset, blocksize=256) with the signed dynamic map."""
    offset = absmax.mean()
    centred = absmax - offset
    absmax2 = block_absmax(centred, blocksize)
    scaled = (_padded_blocks(centred, blocksize) * torch.reciprocal(absmax2).unsqueeze(1)).reshape(-1)
    if absmax.device.type == "cpu":
        with _one_thread():  # a dozen small ops on 1/64 of the weight's elements
            codes = quantize_dynamic(scaled[:centred.numel()], dynamic_map())
    else:
        codes = quantize_dynamic(scaled[:centred.numel()], dynamic_map(absmax.device))
    return DoubleQuant(codes, absmax2, offset, blocksize)


# --- whole tensors: bitsandbytes' quantize_4bit / dequantize_4bit ----------------------------

@dataclass
class QuantState:
    packed: torch.Tensor  # uint8, (numel + 1) // 2 bytes
    absmax: torch.Tensor | None  # float32 per block (no double quantization)
    double: DoubleQuant | None
    shape: tuple[int, ...]
    dtype: torch.dtype  # the dtype the tensor was quantized from (bitsandbytes' quant_state.dtype)
    blocksize: int
    quant_type: str

    def scales(self) -> torch.Tensor:
        return self.double.dequantize() if self.double is not None else self.absmax


_check = check_settings


def quantize_4bit(x: torch.Tensor, blocksize: int = 64, quant_type: str = "nf4",
                  double_quant: bool = False) -> QuantState:
    """x (fp16, bf16 or fp32, as loaded) -> packed codes and scales, as bitsandbytes' CUDA path."""
    _check(blocksize, quant_type)
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"4-bit quantization takes fp16, bf16 or fp32, not {x.dtype}")
    absmax = block_absmax(x, blocksize)
    packed = pack(encode(x, absmax, blocksize, quant_type), x.numel())
    double = double_quantize(absmax) if double_quant else None
    return QuantState(packed, None if double else absmax, double, tuple(x.shape), x.dtype, blocksize, quant_type)


def dequantize_4bit(state: QuantState) -> torch.Tensor:
    n = math.prod(state.shape)
    codes = unpack(state.packed, n)
    return decode(codes, state.scales(), state.blocksize, state.quant_type, state.dtype).view(state.shape)


# --- the QLoRA round trip ----------------------------------------------------------------------

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def load_absmax(w: torch.Tensor, settings: QuantSettings) -> torch.Tensor:
    """block_absmax(w.to(load_dtype)) without converting w: rounding is monotone and symmetric,
    so the rounded max |w| is the max of the rounded |w|."""
    return block_absmax(w, settings.blocksize).to(settings.load).float()


def _roundtrip_flat(w: torch.Tensor, absmax: torch.Tensor, scales: torch.Tensor, settings: QuantSettings,
                    out: torch.Tensor, norms: bool = False) -> tuple[float, float]:
    """out[:] = cast_load(table[code(x * 1/absmax)] * scales), x = w.to(load_dtype), for flat w
    (the original weight) that starts on a block; absmax, scales: its blocks'. With `norms`
    also returns (||q||^2, ||w||^2) for q = cast_compute(out) - w, else (0, 0).

    On the CPU the steps are many small element-wise ops: torch's intra-op threads would meet at
    a barrier after each (slow whenever another process holds a core), so instead each of
    torch.get_num_threads() Python threads takes every n-th step single-threaded (torch releases
    the GIL). On a GPU the whole tensor is one step."""
    bs = settings.blocksize
    n = w.numel()
    sub = SUB_ELEMENTS if w.device.type == "cpu" else max(n, 1)
    steps = list(range(0, n, sub))
    sums: list[tuple[float, float]] = []

    def run(mine: list[int]) -> None:
        q2 = w2 = 0.0
        for start in mine:
            stop = min(start + sub, n)
            b0, b1 = start // bs, -(-stop // bs)
            part = w[start:stop]
            scaled = _scaled(part.to(settings.load), absmax[b0:b1], bs)
            values = _table_values(scaled, settings.quant_type).view(-1, bs)
            values.mul_(scales[b0:b1].unsqueeze(1))
            rounded = out[start:stop]
            rounded.copy_(values.reshape(-1)[:stop - start])  # rounded once to the load dtype
            if norms:  # float32 reductions; `part` is promoted inside them, never copied
                q2 += float(torch.dist(rounded.to(settings.compute).float(), part)) ** 2
                w2 += float(torch.linalg.vector_norm(part, dtype=torch.float32)) ** 2
        sums.append((q2, w2))

    workers = min(torch.get_num_threads(), len(steps)) if w.device.type == "cpu" else 1
    if workers <= 1:
        run(steps)
        return sums[0] if sums else (0.0, 0.0)
    from concurrent.futures import ThreadPoolExecutor

    _value_lut(settings.quant_type)  # build the cached table once, before the threads read it
    saved = torch.get_num_threads()

    def worker(i: int) -> None:  # one intra-op thread per worker; the count is restored below
        torch.set_num_threads(1)
        run(steps[i::workers])

    try:
        with ThreadPoolExecutor(workers, thread_name_prefix="omgtool-nf4") as pool:
            list(pool.map(worker, range(workers)))
    finally:
        torch.set_num_threads(saved)
    return sum(q for q, _ in sums), sum(w for _, w in sums)


def roundtrip(weight: torch.Tensor, settings: QuantSettings) -> torch.Tensor:
    """W_train = cast_compute(dequantize(quantize(W.to(load_dtype)))): what training multiplied by."""
    flat = weight.reshape(-1)
    absmax = load_absmax(flat, settings)
    scales = double_quantize(absmax).dequantize() if settings.double_quant else absmax
    out = torch.empty(flat.shape, dtype=settings.load, device=flat.device)
    _roundtrip_flat(flat, absmax, scales, settings, out)
    return out.to(settings.compute).view(weight.shape)


def aligned_rows(rows: int, cols: int, blocksize: int) -> int:
    """The largest row count <= rows (at least the minimum) whose elements fill whole blocks."""
    step = blocksize // math.gcd(cols, blocksize)
    return max(step, rows // step * step)


class StreamedRoundTrip:
    """The round trip of one tensor, row block by row block, for the streamed merge.

    The scales need the whole tensor (double quantization's offset is the mean of every
    block's absmax), so `__init__` makes one pass over it computing absmax only (float32,
    1/blocksize of the elements); `rows(start, w)` then rounds rows start.. of it. Row blocks
    must start on a quantization block (aligned_rows)."""

    def __init__(self, read: Callable[[int, int], torch.Tensor], shape: tuple[int, ...], settings: QuantSettings,
                 chunk_rows: int, device: str | torch.device = "cpu", release: Callable[[], None] | None = None):
        self.settings = settings
        self.shape = tuple(shape)
        self.cols = math.prod(self.shape[1:]) or 1
        self.device = device
        n_rows = self.shape[0]
        if (chunk_rows * self.cols) % settings.blocksize and chunk_rows < n_rows:
            raise ValueError(f"row blocks of {chunk_rows} x {self.cols} do not fill blocks of {settings.blocksize}")
        parts = []
        for start in range(0, n_rows, chunk_rows):
            parts.append(load_absmax(read(start, min(start + chunk_rows, n_rows)).to(device), settings))
            if release is not None:  # e.g. drop the mmap pages read so far
                release()
        self.absmax = torch.cat(parts)
        self.double = double_quantize(self.absmax) if settings.double_quant else None
        self.scales = self.double.dequantize() if self.double is not None else self.absmax

    def rows(self, start: int, w: torch.Tensor, norms: list[float] | None = None) -> torch.Tensor:
        """W_train for rows start.. (w: those rows of the original weight). `norms`, a list
        [||q||^2, ||W||^2], is added to."""
        s = self.settings
        first = start * self.cols
        if first % s.blocksize:
            raise ValueError(f"row block at {start} does not start on a quantization block of {s.blocksize}")
        b0 = first // s.blocksize
        flat = w.to(device=self.device).reshape(-1)
        nb = -(-w.numel() // s.blocksize)
        out = torch.empty(flat.shape, dtype=s.load, device=flat.device)
        q2, w2 = _roundtrip_flat(flat, self.absmax[b0:b0 + nb], self.scales[b0:b0 + nb], s, out, norms is not None)
        if norms is not None:
            norms[0] += q2
            norms[1] += w2
        return out.to(s.compute).view(w.shape)


class WeightTrip:
    """The NF4 base-weight step of a streamed merge (registered in
    omgtool.kernels.transforms.WEIGHT_TRANSFORMS as nf4_roundtrip and nf4_measure).

    `params["nf4"]` holds the QuantSettings values. One absmax pass over the weight at
    construction (StreamedRoundTrip); then `step(start, rows)` returns W_train's rows
    (replace=True: the weights training multiplied by) or the original rows unchanged
    (replace=False: a standard merge that only measures), measuring q = W_train - W in both
    modes. `rows` is the row block size the kernel must use (whole quantization blocks)."""

    def __init__(self, read: Callable[[int, int], torch.Tensor], shape: tuple[int, ...], params: dict,
                 rows: int, device: str | torch.device = "cpu", release: Callable[[], None] | None = None,
                 replace: bool = True):
        settings = QuantSettings(**params["nf4"])
        cols = math.prod(shape[1:]) or 1
        self.rows = aligned_rows(rows, cols, settings.blocksize)
        self.replace = replace
        self.trip = StreamedRoundTrip(read, tuple(shape), settings, self.rows, device, release=release)
        self.norms = [0.0, 0.0]  # ||q||^2, ||W||^2 (float32 per step, summed in float64)

    def __call__(self, start: int, w: torch.Tensor) -> torch.Tensor:
        w_train = self.trip.rows(start, w, self.norms)
        return w_train if self.replace else w

    def record(self) -> dict[str, float]:
        return {"q_norm": math.sqrt(self.norms[0]), "w_norm": math.sqrt(self.norms[1])}
