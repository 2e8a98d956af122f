"""What reading a checkpoint costs per metadata value (issue 12: `inspect`/`diff` of any file
under 10 MB peaks below 200 MB).

Each case is a scaled-down `bench.bench_readers` wide-metadata file or a variant that stresses
the same path differently. The measure is tracemalloc's peak over `open_checkpoint` (the scan,
then the reader: both walk the pickle) divided by the number of values in the pickle. The
floor is the walker's own stand-ins for the values (a Python int is 32 bytes and its list slot
8 more; the pickle's bytes are held too); the bounds leave room above that floor and none for
a second copy of the value, per-child lists, or a memo dict next to it.
"""

from __future__ import annotations

import tracemalloc

import pytest
import torch

from omgtool.formats import open_checkpoint

N = 60_000


def _chain(depth: int, leaf):
    for _ in range(depth):
        leaf = [leaf]
    return leaf


# name -> (the saved object's metadata, how many values it holds, bytes per value allowed)
CASES = {
    "ints and strings": (lambda: {"history": list(range(N - N // 6)), "names": [str(i) for i in range(N // 6)]},
                         N, 96),
    "floats": (lambda: {"losses": [i + 0.5 for i in range(N)]}, N, 80),
    "a dict": (lambda: {"table": {f"k{i}": i for i in range(N)}}, N, 192),
    "nested lists": (lambda: {"nested": [_chain(95, i) for i in range(N // 96)]}, N, 160),
}


@pytest.fixture(scope="module")
def warm(tmp_path_factory):
    """Import what open_checkpoint imports lazily, so the measured peak is the reading alone."""
    path = tmp_path_factory.mktemp("warm") / "warm.pth"
    torch.save({"w": torch.ones(2), "history": [1, 2, 3]}, path)
    open_checkpoint(path)


@pytest.mark.parametrize("case", list(CASES))
def test_reading_peak_per_metadata_value(tmp_path, warm, case):
    build, values, bound = CASES[case]
    path = tmp_path / "wide.pth"
    torch.save({"w": torch.ones(2), **build()}, path)
    tracemalloc.start()
    try:
        ckpt = open_checkpoint(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert list(ckpt.tensors) == ["w"] and ckpt.safety.verdict == "safe"
    per_value = peak / values
    assert per_value < bound, f"{case}: {per_value:.0f} bytes per value (peak {peak / 1e6:.1f} MB)"
