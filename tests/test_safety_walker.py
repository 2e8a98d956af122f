"""The walker against CPython's own C unpickler (the oracle), on benign pickles only: where
`Modules/_pickle.c` and `pickletools` differ, the walker must agree with `_pickle.c`.
Hostile resource use (nesting, MARK floods, memo floods, huge lengths) finishes fast.
"""

from __future__ import annotations

import collections
import io
import json
import pickle
import struct
import subprocess
import sys

import pytest

from omgtool.formats.pickle_grades import grade_global
from omgtool.formats.pickle_walker import MalformedPickle, walk

BENIGN = {
    "ints": [0, 1, -1, 255, 256, 65535, -65536, 2**31, 2**64, -(2**70)],
    "floats": [0.5, -1e300, float("inf")],
    "text": ["", "x", "ü" * 300, "\n\\'\""],
    "bytes": [b"", b"\x00\xff" * 200, bytearray(b"ab")],
    "nested": {"a": [1, (2, 3), {"b": None}], (1, "k"): True, 3: False},
    "sets": [{1, 2}, frozenset({"a"})],
    "od": collections.OrderedDict(x=1, y=[2]),
    "complex": 1 + 2j,
    "shared": [[1]] * 3,
}


@pytest.mark.parametrize("protocol", range(6))
def test_benign_values_match_pickle_loads(protocol):
    raw = pickle.dumps(BENIGN, protocol=protocol)
    result = walk(raw)
    assert result.findings == []
    assert result.value == pickle.loads(raw)
    assert walk(raw, mode="memory").value == pickle.loads(raw)


@pytest.mark.parametrize("raw", [
    b"K\x01K\x02.",  # STOP with two items: CPython returns the top one
    b"(0K\x05.",  # POP with an empty segment pops the MARK
    b"\x80\x04K\x01q\x05\x94K\x02h\x01\x86.",  # MEMOIZE keys are the memo's size (after a PUT 5)
    b"\x80\x02K\x01\x80\x04\x85.",  # PROTO in the middle
    b"(K\x01(K\x02.",  # open MARKs at STOP: the top of the current segment
    b"I01\n.",  # protocol 0 booleans
    b"\x80\x02]q\x00(K\x01K\x02e.",
])
def test_c_unpickler_semantics(raw):
    assert walk(raw).value == pickle.loads(raw)


@pytest.mark.parametrize("raw", [b"(.", b"0.", b"\x80\x06N.", b"h\x00.", b"\x93.", b"}K\x01d."])
def test_c_unpickler_errors_are_errors(raw):
    with pytest.raises(Exception):
        pickle.loads(raw)
    with pytest.raises(MalformedPickle):
        walk(raw)


def test_frame_overrun_follows_the_file_unpickler_and_pickle_loads():
    """An argument overrunning its FRAME: a file-based C unpickler (torch.load's io.BytesIO)
    drops the rest of the frame; pickle.loads reads on. The walker follows each in its mode."""
    frame = b"X\x04\x00"  # BINUNICODE whose length field is split by the frame's end
    data = b"\x80\x04\x95" + struct.pack("<Q", len(frame)) + frame + b"\0\0\0\0" + b"K\x07" + b"."
    from_file = pickle.load(io.BytesIO(data))
    from_memory = pickle.loads(data)
    assert from_file == 7 and from_memory == "\0\0K\x07"  # the two loaders really disagree
    file_walk, memory_walk = walk(data, mode="file"), walk(data, mode="memory")
    assert file_walk.value == from_file and memory_walk.value == from_memory
    assert file_walk.overrun and [f.name for f in file_walk.findings] == ["<FRAME overrun>"]
    assert file_walk.findings[0].grade == "dangerous"


def test_counted_bytes_across_a_frame_are_contiguous():
    frame = b"C\x05ab"  # SHORT_BINBYTES 5: two bytes inside the frame, three after it
    data = b"\x80\x04\x95" + struct.pack("<Q", len(frame)) + frame + b"cde."
    assert pickle.load(io.BytesIO(data)) == pickle.loads(data) == b"abcde"
    result = walk(data)
    assert result.value == b"abcde" and not result.overrun and result.findings == []


def test_findings_survive_a_malformed_tail():
    raw = b"\x80\x02cposix\nsystem\nX\x02\x00\x00\x00id\x85Rh\x09."
    with pytest.raises(MalformedPickle) as info:
        walk(raw)
    assert [f.target for f in info.value.result.findings] == ["posix.system"]


@pytest.mark.parametrize("module,name,grade", [
    ("builtins", "set", "safe"), ("__builtin__", "set", "safe"), ("collections", "OrderedDict", "safe"),
    ("torch._utils", "_rebuild_tensor_v2", "safe"), ("numpy.core.multiarray", "scalar", "safe"),
    ("argparse", "Namespace", "unknown"), ("omegaconf.dictconfig", "DictConfig", "unknown"),
    ("pytorch_lightning.utilities.parsing", "AttributeDict", "unknown"),
    ("transformers.training_args", "TrainingArguments", "unknown"),
    ("numpy.core.multiarray", "_reconstruct", "unknown"), ("torch.nn.modules.linear", "Linear", "unknown"),
    ("os", "system", "dangerous"), ("posix", "system", "dangerous"), ("subprocess", "Popen", "dangerous"),
    ("__builtin__", "eval", "dangerous"), ("builtins", "getattr", "dangerous"),
    ("builtins", "__import__", "dangerous"), ("operator", "attrgetter", "dangerous"),
    ("torch.storage", "_load_from_bytes", "dangerous"), ("socket", "create_connection", "dangerous"),
    ("collections", "OrderedDict.__init__.__globals__", "dangerous"),
])
def test_grades(module, name, grade):
    assert grade_global(module, name)[0] == grade


def test_allow_accepts_unknown_only():
    raw = pickle.dumps({"ns": __import__("argparse").Namespace(a=1)}, protocol=2)
    assert [f.grade for f in walk(raw).findings] == ["unknown"]
    assert walk(raw, allow={"argparse.Namespace"}).findings == []
    evil = b"\x80\x02cposix\nsystem\nX\x02\x00\x00\x00id\x85R."
    assert [f.grade for f in walk(evil, allow={"posix.system"}).findings] == ["dangerous"]


_HOSTILE = r"""
import json, sys, time
from omgtool.formats.pickle_walker import MalformedPickle, walk
from omgtool.formats.containers import TooDeep, find_tensors
cases = {
    "deep_tuple": b"\x80\x02N" + b"\x85" * 1_000_000 + b".",
    "deep_tuple_key": b"\x80\x02}N" + b"\x85" * 200_000 + b"Ns.",
    "deep_list": b"\x80\x02" + b"]" * 1 + b"(]" * 300_000 + b"e" * 300_000 + b".",
    "mark_flood": b"(" * 2_000_000 + b".",
    "opcode_flood": b"N0" * 3_000_000 + b"N.",
    "memo_flood": b"\x80\x04N" + b"\x94" * 2_000_000 + b".",
    "huge_unicode8": b"\x80\x04\x8d" + (2**62).to_bytes(8, "little") + b"x.",
    "huge_long4": b"\x80\x02\x8b" + (2**30).to_bytes(4, "little") + b"\x00" * 64 + b".",
    "cycle": b"\x80\x02]q\x00h\x00a.",
}
# a billion-laughs DAG: L[i+1] = [L[i], L[i]], 60 levels deep, built through the memo
laughs = bytearray(b"\x80\x02]q\x00")
for i in range(60):
    laughs += b"]q" + bytes([i + 1]) + b"(h" + bytes([i]) + b"h" + bytes([i]) + b"e0"
laughs += b"h" + bytes([60]) + b"."
cases["laughs"] = bytes(laughs)
# one flat list of 200,000 values, then a list holding it 200,000 times (through the memo):
# each repeat is recognised in constant time, not by re-reading the 200,000 values
cases["shared_flat"] = b"\x80\x02]q\x00(" + b"K\x01" * 200_000 + b"e](" + b"h\x00" * 200_000 + b"e."
out = {}
for name, raw in cases.items():
    start = time.perf_counter()
    try:
        result = walk(raw)
        status = "ok"
        try:  # what the reader then builds from the value (tensors, metadata summary) is bounded too
            json.dumps(find_tensors(result.value).metadata, default=str)
        except TooDeep:
            pass  # the reader refuses it as nested too deep (exit 2)
        findings = [f.name for f in result.findings]
    except MalformedPickle as exc:
        status = "malformed"
        findings = [f.name for f in (exc.result.findings if exc.result else [])]
    out[name] = {"status": status, "seconds": time.perf_counter() - start, "findings": findings}
# VmHWM is this process image's own peak (ru_maxrss would include the parent's, from before exec)
hwm = [line for line in open("/proc/self/status") if line.startswith("VmHWM:")][0]
out["max_rss_mb"] = int(hwm.split()[1]) / 1024
print(json.dumps(out))
"""


def test_hostile_resource_use_finishes_fast_with_bounded_memory():
    proc = subprocess.run([sys.executable, "-c", _HOSTILE], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]  # no segfault, no RecursionError escaping
    out = json.loads(proc.stdout)
    rss = out.pop("max_rss_mb")
    for name, row in out.items():
        assert row["seconds"] < 10, (name, row)
    assert rss < 1500, rss
    assert out["mark_flood"]["findings"] == ["<scan stopped>"]
    assert out["opcode_flood"]["findings"] == ["<scan stopped>"]
    assert out["memo_flood"]["findings"] == ["<scan stopped>"]
    assert out["huge_unicode8"]["status"] == "malformed"
    assert out["cycle"]["status"] == out["laughs"]["status"] == out["deep_tuple"]["status"] == "ok"
    assert out["shared_flat"]["status"] == "ok"


def test_the_containers_a_pickle_builds_are_bounded():
    """An empty set is 216 bytes from one opcode byte: a 1 MB pickle could build 200 MB of
    them. The walker stops at MAX_BUILT_BYTES of containers and call results (unknown)."""
    import tracemalloc

    from omgtool.formats import pickle_walker as pw

    def sets(n: int) -> bytes:  # [set(), set(), ...]: EMPTY_LIST MARK EMPTY_SET*n APPENDS STOP
        return b"\x80\x04](" + b"\x8f" * n + b"e."

    fits = pw.walk(sets(100_000))  # 22 MB of sets: read
    assert len(fits.value) == 100_000
    n = pw.MAX_BUILT_BYTES // 216 + 50_000
    tracemalloc.start()
    try:
        with pytest.raises(pw.MalformedPickle, match="MiB of values built") as info:
            pw.walk(sets(n))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < pw.MAX_BUILT_BYTES + (40 << 20)
    assert any(f.name == "<scan stopped>" and f.grade == "unknown" for f in info.value.result.findings)
