"""Hand-built checkpoint files for reader and safety tests.

`write_torch_zip` writes the torch zip layout (archive/data.pkl + STORED storages)
from pieces the test controls, so tests can produce files torch itself would never
write: missing members, short storages, compressed members, hostile pickles.
"""

from __future__ import annotations

import collections
import io
import pickle
import zipfile
from pathlib import Path

import torch


class _Storage:
    def __init__(self, key: str, storage_type, numel: int):
        self.key, self.storage_type, self.numel = key, storage_type, numel


class _TensorStub:
    """Pickles as torch._utils._rebuild_tensor_v2(storage, offset, size, stride, False, OrderedDict())."""

    def __init__(self, storage: _Storage, offset: int, size, stride):
        self.args = (storage, offset, tuple(size), tuple(stride), False, collections.OrderedDict())

    def __reduce__(self):
        return torch._utils._rebuild_tensor_v2, self.args


class _TorchPickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, _Storage):
            return ("storage", obj.storage_type, obj.key, "cpu", obj.numel)
        return None


def tensor_entry(key: str, storage_type, storage_numel: int, shape, stride=None, offset: int = 0):
    if stride is None:
        stride, acc = [], 1
        for s in reversed(shape):
            stride.insert(0, acc)
            acc *= s
    return _TensorStub(_Storage(key, storage_type, storage_numel), offset, shape, stride)


def data_pkl(obj, protocol: int = 2, memo: bool = True) -> bytes:
    """`memo=False`: no PUT/MEMOIZE at all (the pickler's fast mode), so a million values stay
    within the walker's memo cap; torch.load reads it all the same."""
    buf = io.BytesIO()
    pickler = _TorchPickler(buf, protocol=protocol)
    pickler.fast = not memo
    pickler.dump(obj)
    return buf.getvalue()


def write_torch_zip(path: Path, pickle_bytes: bytes, storages: dict[str, bytes], prefix: str = "archive",
                    extra_members: dict[str, bytes] | None = None, compress_storages: bool = False) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{prefix}/data.pkl", pickle_bytes, compress_type=zipfile.ZIP_STORED)
        zf.writestr(f"{prefix}/byteorder", b"little")
        for key, raw in storages.items():
            kind = zipfile.ZIP_DEFLATED if compress_storages else zipfile.ZIP_STORED
            zf.writestr(f"{prefix}/data/{key}", raw, compress_type=kind)
        for name, raw in (extra_members or {}).items():
            zf.writestr(f"{prefix}/{name}", raw)
        zf.writestr(f"{prefix}/version", b"3\n")
    return path


def simple_state(storage_numel: int = 6, shape=(2, 3)) -> tuple[bytes, dict[str, bytes]]:
    """A one-tensor state dict whose storage holds `storage_numel` float32 values."""
    sd = collections.OrderedDict(w=tensor_entry("0", torch.FloatStorage, storage_numel, shape))
    raw = torch.arange(storage_numel, dtype=torch.float32).numpy().tobytes()
    return data_pkl(sd), {"0": raw}
