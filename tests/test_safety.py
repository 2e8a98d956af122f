"""Hostile pickles: each is refused with exit 3 and its payload provably never runs.

Every payload writes a marker file if executed. `test_payloads_are_live` proves the
payloads do run under the real unpickler, so the other tests' "marker absent"
assertions mean something.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import pickletools
import subprocess
import sys
import zipfile

import pytest
import torch
from typer.testing import CliRunner

from omgtool.cli import app
from omgtool.errors import UnsafeInput
from omgtool.formats import open_checkpoint
from tests.ckpt_builders import data_pkl, tensor_entry, write_torch_zip

runner = CliRunner()


class _System:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class _Exec:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)


class _Popen:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return subprocess.Popen, (["touch", self.marker],)


class _Nested:
    """A state dict entry whose payload hides two levels down in containers."""

    def __init__(self, marker):
        self.inner = {"meta": [(1, _System(marker))]}

    def __reduce__(self):
        return collections.OrderedDict, ((("cfg", self.inner),),)


def _state_with(payload) -> bytes:
    sd = collections.OrderedDict()
    sd["w"] = tensor_entry("0", torch.FloatStorage, 4, (4,))
    sd["payload"] = payload
    return data_pkl(sd, protocol=3)  # protocol 2 would rename modules to their Python 2 names


def _zip_with(tmp_path, pickle_bytes, name="evil.pth", **kw):
    return write_torch_zip(tmp_path / name, pickle_bytes, {"0": bytes(16)}, **kw)


def _inst_pickle(marker) -> bytes:
    # protocol 0: MARK, string arg, INST os system -> os.system("touch marker")
    return b"(S'touch " + str(marker).encode() + b"'\nios\nsystem\np0\n."


def _obj_pickle(marker) -> bytes:
    # MARK, GLOBAL os.system, arg, OBJ -> calls os.system(arg)
    return b"(cos\nsystem\nS'touch " + str(marker).encode() + b"'\no."


def _stack_global_pickle(marker) -> bytes:
    return pickle.dumps(_System(marker), protocol=4)  # uses STACK_GLOBAL + MEMOIZE


def _assert_refused(path, marker, expected_global):
    result = runner.invoke(app, ["inspect", str(path)])
    assert result.exit_code == 3, result.output
    assert result.stderr.startswith("error: "), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert expected_global in result.stderr
    assert "Traceback" not in result.output
    assert not marker.exists(), "payload ran"
    with pytest.raises(UnsafeInput) as info:
        open_checkpoint(path)
    assert any(f"{f.module}.{f.name}" == expected_global for f in info.value.findings)
    assert not marker.exists(), "payload ran"
    return info.value.findings


def test_payloads_are_live(tmp_path):
    """The same payloads DO run under pickle.loads: the marker assertions below are meaningful."""
    for i, payload in enumerate([_System, _Exec, _Popen]):
        marker = tmp_path / f"live{i}"
        obj = pickle.loads(pickle.dumps(payload(marker), protocol=2))
        if isinstance(obj, subprocess.Popen):
            obj.wait()
        assert marker.exists()
    marker = tmp_path / "live_inst"
    pickle.loads(_inst_pickle(marker))
    assert marker.exists()


@pytest.mark.parametrize("payload,expected", [
    (_System, f"{os.system.__module__}.system"),
    (_Exec, "builtins.exec"),
    (_Popen, "subprocess.Popen"),
    (_Nested, f"{os.system.__module__}.system"),
])
def test_zip_payload_refused(tmp_path, payload, expected):
    marker = tmp_path / "marker"
    path = _zip_with(tmp_path, _state_with(payload(marker)))
    findings = _assert_refused(path, marker, expected)
    assert all(f.member.endswith("data.pkl") for f in findings)
    assert all(f.offset > 0 for f in findings)


@pytest.mark.parametrize("builder,opcode,expected", [
    (_inst_pickle, "INST", "os.system"),
    (_obj_pickle, "OBJ", "os.system"),
    (_stack_global_pickle, "STACK_GLOBAL", f"{os.system.__module__}.system"),
])
def test_construction_opcodes_refused(tmp_path, builder, opcode, expected):
    marker = tmp_path / "marker"
    raw = builder(marker)
    assert opcode in {op.name for op, _, _ in pickletools.genops(raw)}
    path = _zip_with(tmp_path, raw)
    findings = _assert_refused(path, marker, expected)
    assert any(f.opcode in (opcode, "GLOBAL") for f in findings)


def test_json_reports_findings(tmp_path):
    marker = tmp_path / "marker"
    path = _zip_with(tmp_path, _state_with(_System(marker)))
    result = runner.invoke(app, ["inspect", str(path), "--json"])
    assert result.exit_code == 3
    import json

    report = json.loads(result.stdout)
    assert report["safety"]["verdict"] == "dangerous"
    finding = report["safety"]["findings"][0]
    assert finding["global"] == f"{os.system.__module__}.system"
    assert finding["opcode"] == "GLOBAL" and finding["offset"] > 0
    assert finding["grade"] == "dangerous" and finding["member"].endswith("data.pkl") and finding["why"]
    assert [t["name"] for t in report["tensors"]] == ["w"]  # still listed, from the opcode walk
    assert not marker.exists()


def test_extra_pickle_member_is_scanned(tmp_path):
    """torch loads only data.pkl, but a hostile archive may carry other pickles: scan them all."""
    marker = tmp_path / "marker"
    good = data_pkl(collections.OrderedDict(w=tensor_entry("0", torch.FloatStorage, 4, (4,))))
    path = _zip_with(tmp_path, good, extra_members={"other.pkl": pickle.dumps(_System(marker), protocol=2)})
    findings = _assert_refused(path, marker, f"{os.system.__module__}.system")
    assert findings[0].member.endswith("other.pkl")


def test_legacy_payload_refused(tmp_path):
    marker = tmp_path / "marker"
    path = tmp_path / "legacy.pth"
    buf = io.BytesIO()
    for obj in (0x1950A86A20F9469CFC6C, 1001, {"protocol_version": 1001, "little_endian": True}):
        pickle.dump(obj, buf, protocol=2)
    pickle.dump({"w": _System(marker)}, buf, protocol=2)
    path.write_bytes(buf.getvalue())
    _assert_refused(path, marker, f"{os.system.__module__}.system")


def test_ext_opcode_refused(tmp_path):
    raw = b"\x80\x02\x82\x01."  # PROTO 2, EXT1 1, STOP: copyreg extension registry lookup
    path = _zip_with(tmp_path, raw)
    result = runner.invoke(app, ["inspect", str(path)])
    assert result.exit_code == 3
    assert "EXT1" in result.stderr


def test_build_on_foreign_object_refused(tmp_path):
    marker = tmp_path / "marker"

    class Stateful:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",), {"x": 1})  # REDUCE then BUILD

    path = _zip_with(tmp_path, _state_with(Stateful()))
    _assert_refused(path, marker, f"{os.system.__module__}.system")


def test_numpy_metadata_is_inert(tmp_path):
    """numpy scalars are allowlisted inert stubs; numpy arrays are unknown (numpy code rebuilds
    them) unless allowed. numpy is never imported either way."""
    import numpy as np

    scalars = tmp_path / "np_scalars.pth"
    torch.save({"w": torch.ones(3), "step": np.int64(7), "loss": np.float32(0.5)}, scalars)
    arrays = tmp_path / "np_arrays.pth"
    torch.save({"w": torch.ones(3), "arr": np.arange(3)}, arrays)
    code = ("import sys; from omgtool.formats import open_checkpoint; from omgtool.errors import UnsafeInput\n"
            f"c = open_checkpoint({str(scalars)!r}); print(sorted(c.tensors), c.safety.verdict)\n"
            f"try:\n    open_checkpoint({str(arrays)!r})\nexcept UnsafeInput as e:\n    print(e.verdict, "
            "sorted(f.name for f in e.findings))\n"
            "print('numpy' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.splitlines() == ["['w'] safe", "unknown ['_reconstruct', 'ndarray']", "False"]


def test_inspect_never_imports_torch(tmp_path):
    """The metadata path stays free of torch (speed, and nothing that could unpickle)."""
    path = tmp_path / "ok.pth"
    torch.save({"w": torch.ones(2, 2)}, path)
    code = ("import sys; from typer.testing import CliRunner; from omgtool.cli import app; "
            f"r = CliRunner().invoke(app, ['inspect', {str(path)!r}, '--json']); "
            "print(r.exit_code, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "0 False"


def test_unresolvable_stack_global_is_a_finding(tmp_path):
    # STACK_GLOBAL whose operands are not strings (an int and a string)
    raw = b"\x80\x04K\x01\x8c\x06system\x93)R."
    path = _zip_with(tmp_path, raw)
    result = runner.invoke(app, ["inspect", str(path)])
    assert result.exit_code == 3
    assert "unresolved" in result.stderr


def test_zip_listing_cannot_hide_members(tmp_path):
    """A zip that Python's zipfile rejects is never 'inspected' as safe."""
    path = tmp_path / "bad.pth"
    path.write_bytes(b"PK\x03\x04" + os.urandom(64))
    result = runner.invoke(app, ["inspect", str(path)])
    assert result.exit_code == 2
    assert "corrupt zip" in result.stderr
    assert zipfile.is_zipfile(path) is False
