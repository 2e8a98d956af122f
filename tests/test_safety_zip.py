"""The torch-faithful zip reader (formats/zip_reader.py) against torch's own reader: on
archives where Python's zipfile and torch's miniz disagree, omgtool reads what torch reads.
Every archive here is benign (weights only), so torch.load(weights_only=True) is the oracle.
"""

from __future__ import annotations

import collections
import struct
import zipfile

import pytest
import torch

from omgtool.formats import open_checkpoint
from omgtool.formats.scan import scan_file
from omgtool.formats.zip_reader import ZipError, read_zip
from tests.safety_corpus import _Storage, _Tensor, torch_pickle, torch_zip_entries, two_directory_polyglot, zip_bytes


def _variant(value: float, key: str = "0"):
    sd = collections.OrderedDict(w=_Tensor(_Storage(key, torch.FloatStorage, 4), (4,)))
    return torch_pickle(sd), struct.pack("<4f", *[value] * 4)


A_PKL, A_DATA = _variant(1.0, "0")
B_PKL, B_DATA = _variant(2.0, "1")
STORAGE_5 = struct.pack("<4f", *[5.0] * 4)

ARCHIVES = {
    "duplicate data.pkl, first read": [("archive/data.pkl", A_PKL), ("archive/data/0", A_DATA),
                                       ("archive/data/1", B_DATA), ("archive/version", b"3\n"),
                                       ("archive/data.pkl", B_PKL)],
    "duplicate data.pkl, last read": [("archive/data.pkl", B_PKL), ("archive/data/0", A_DATA),
                                      ("archive/data/1", B_DATA), ("archive/version", b"3\n"),
                                      ("archive/data/0", STORAGE_5), ("archive/data.pkl", A_PKL)],
    "case-insensitive name": [("archive/Data.PKL", A_PKL), ("archive/data/0", A_DATA), ("archive/version", b"3\n")],
    "duplicate storage": [("archive/data.pkl", A_PKL), ("archive/data/0", A_DATA), ("archive/version", b"3\n"),
                          ("archive/data/0", STORAGE_5), ("archive/x", b"1"), ("archive/y", b"2")],
}


@pytest.mark.parametrize("name", sorted(ARCHIVES))
def test_reads_what_torch_reads(tmp_path, name):
    path = tmp_path / "ckpt.pth"
    path.write_bytes(zip_bytes(ARCHIVES[name]))
    expected = torch.load(path, weights_only=True)["w"]
    assert torch.equal(open_checkpoint(path).read("w"), expected)


def test_two_central_directories(tmp_path):
    """zipfile reads the directory before the end record; torch the one the record points to."""
    path = tmp_path / "poly.pth"
    b_pkl = B_PKL.replace(b"X\x01\x00\x00\x001", b"X\x01\x00\x00\x000")  # storage key "0" in both
    path.write_bytes(two_directory_polyglot(torch_zip_entries(A_PKL, A_DATA),
                                            torch_zip_entries(b_pkl, struct.pack("<4f", *[2.0] * 4))))
    zf = zipfile.ZipFile(path)
    assert struct.unpack("<f", zf.read("archive/data/0")[:4])[0] == 2.0  # Python's view
    torch_view = torch.load(path, weights_only=True)["w"]
    assert torch_view.tolist() == [1.0] * 4  # torch's view differs
    assert torch.equal(open_checkpoint(path).read("w"), torch_view)
    assert scan_file(path).verdict == "safe"  # both views scanned, both benign


def test_prepended_data_is_what_torch_refuses(tmp_path):
    raw = zip_bytes(torch_zip_entries(A_PKL, A_DATA))
    with pytest.raises(ZipError, match="stated offset"):
        read_zip(b"PK\x03\x04" + b"\0" * 60 + raw)
    assert zipfile.ZipFile(__import__("io").BytesIO(b"\0" * 64 + raw)).namelist()  # zipfile copes


def test_zip64_archive_from_torch(tmp_path):
    """torch writes zip64 records for large files; the reader follows the zip64 locator."""
    import io

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("archive/data.pkl", A_PKL)
        zf.writestr("archive/data/0", A_DATA)
        zf.writestr("archive/version", b"3\n")
    raw = buf.getvalue()
    eocd = raw.rindex(b"PK\x05\x06")
    _, disk, cd_disk, n_disk, n, cd_size, cd_offset, comment = struct.unpack("<4s4H2LH", raw[eocd:eocd + 22])
    z64 = struct.pack("<4sQ2H2L4Q", b"PK\x06\x06", 44, 45, 45, 0, 0, n, n, cd_size, cd_offset)
    locator = struct.pack("<4sLQL", b"PK\x06\x07", 0, eocd, 1)
    end = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, 0xFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0)
    path = tmp_path / "z64.pth"
    path.write_bytes(raw[:eocd] + z64 + locator + end)
    expected = torch.load(path, weights_only=True)["w"]
    assert torch.equal(open_checkpoint(path).read("w"), expected)


def test_file_opcode_budget_spans_members(tmp_path, monkeypatch):
    """Many members, each under the per-stream cap, still share one budget per file."""
    import omgtool.formats.scan as scan

    monkeypatch.setattr(scan, "MAX_FILE_OPCODES", 1000)
    member = b"\x80\x02" + b"N0" * 400 + b"N."  # about 800 opcodes, benign
    path = tmp_path / "many.zip"
    path.write_bytes(zip_bytes([(f"archive/m{i}.pkl", member) for i in range(3)]))
    result = scan.scan_file(path)
    assert result.verdict == "unknown"
    assert result.findings and {f.name for f in result.findings} == {"<scan stopped>"}
    monkeypatch.setattr(scan, "MAX_FILE_OPCODES", 10_000)
    assert scan.scan_file(path).verdict == "safe"


def _memory_peak(fn):
    import tracemalloc

    tracemalloc.start()
    try:
        result = fn()
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("where", ["torch's pickle", "another member", "zipfile view"])
def test_a_deflate_bomb_is_not_inflated_past_the_cap(tmp_path, where):
    import io

    from omgtool.errors import UnreadableInput
    from omgtool.formats import scan

    bomb = b"(" * (2 * scan.MAX_INFLATED_BYTES)  # 2x the cap of MARK opcodes, about 130 KB deflated
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        if where == "another member":
            zf.writestr("archive/data.pkl", A_PKL)
            zf.writestr("archive/data/0", A_DATA)
        zf.writestr("archive/extra.pkl" if where == "another member" else "archive/data.pkl", bomb,
                    compress_type=zipfile.ZIP_DEFLATED)
    path = tmp_path / "bomb.pth"
    # "zipfile view": data prepended to the archive; only Python's zipfile corrects its offsets
    path.write_bytes((b"\0" * 4096 if where == "zipfile view" else b"") + buf.getvalue())

    def scan_it():
        try:
            return scan_file(path)
        except UnreadableInput as exc:
            return exc

    result, peak = _memory_peak(scan_it)
    assert peak < scan.MAX_INFLATED_BYTES + (8 << 20)  # never the whole 128 MiB
    if where == "torch's pickle":  # refused as the reader refuses it: too large to inflate
        assert isinstance(result, UnreadableInput) and "implausibly large" in str(result)
        return
    assert result.verdict == "unknown"
    unscanned = [f.member for f in result.findings if f.name == "<member not scanned>"]
    assert unscanned and all(("(zipfile view)" in m) == (where == "zipfile view") for m in unscanned), \
        result.findings


def test_a_large_compressed_npy_without_objects_is_scanned_by_its_header(tmp_path):
    import numpy as np

    from omgtool.formats import scan

    path = tmp_path / "big.npz"
    np.savez_compressed(path, zeros=np.zeros(scan.MAX_INFLATED_BYTES // 8 + 1024, dtype=np.float64))
    result, peak = _memory_peak(lambda: scan_file(path))
    assert result.verdict != "unknown" and not result.findings, result.findings
    assert result.kind == "npz" and peak < 16 << 20
    objects = tmp_path / "objects.npz"
    np.savez_compressed(objects, a=np.array([{"k": 1}] * 4, dtype=object))
    assert scan_file(objects).streams  # an object array's pickle is still walked
