"""Every reader and container, compared against torch's own loader (weights_only=True) as
the oracle; and every kind of unreadable input exits 2 with one line."""

from __future__ import annotations

import json
import shutil
import struct
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from fixtures import generate as gen
from omgtool.cli import app
from omgtool.errors import UnreadableInput
from omgtool.formats import open_checkpoint
from tests.ckpt_builders import data_pkl, simple_state, tensor_entry, write_torch_zip

from tests.paths import BASE, FINETUNE
runner = CliRunner()


@pytest.fixture(scope="module")
def finetune_sd():
    return torch.load(FINETUNE, weights_only=True)


def _assert_same(ckpt, expected: dict, ordered: bool = True):
    if ordered:
        assert list(ckpt.tensors) == list(expected)
    assert set(ckpt.tensors) == set(expected)
    for name, tensor in expected.items():
        info = ckpt.tensors[name]
        assert info.shape == tuple(tensor.shape)
        got = ckpt.read(name)
        assert got.dtype == tensor.dtype
        assert torch.equal(got, tensor), name


@pytest.mark.parametrize("container,fmt,wrapper", [
    ("zip", "torch-zip", None),
    ("legacy", "torch-legacy", None),
    ("module", "torch-zip", "module"),
    ("state_dict", "torch-zip", "state_dict"),
    ("safetensors", "safetensors", None),
])
def test_containers(tmp_path, finetune_sd, container, fmt, wrapper):
    suffix = ".safetensors" if container == "safetensors" else ".pth"
    path = gen.write_checkpoint(finetune_sd, tmp_path / f"ckpt{suffix}", container)
    ckpt = open_checkpoint(path)
    assert ckpt.format == fmt
    assert ckpt.container == wrapper
    _assert_same(ckpt, finetune_sd, ordered=container != "safetensors")  # safetensors sorts names


def test_deepspeed_folder_and_file(tmp_path, finetune_sd):
    folder = gen.write_checkpoint(finetune_sd, tmp_path / "ds", "deepspeed")
    ckpt = open_checkpoint(folder)
    assert ckpt.format == "deepspeed" and ckpt.container == "module"
    assert ckpt.metadata["global_steps"] == 1
    _assert_same(ckpt, finetune_sd)
    inner = next(Path(folder).glob("*/mp_rank_00_model_states.pt"))
    _assert_same(open_checkpoint(inner), finetune_sd)


def test_hf_sharded_safetensors_folder():
    ckpt = open_checkpoint(BASE)
    assert ckpt.format.startswith("hf-folder (safetensors, 2 shards)")
    assert ckpt.metadata["config"]["model_type"] == "internlm2"
    expected = {}
    for shard in sorted(BASE.glob("*.safetensors")):
        expected.update(load_file(shard))
    assert set(ckpt.tensors) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(ckpt.read(name), tensor)


def test_hf_bin_folders(tmp_path, finetune_sd):
    single = tmp_path / "single"
    single.mkdir()
    torch.save(finetune_sd, single / "pytorch_model.bin")
    _assert_same(open_checkpoint(single), finetune_sd)

    sharded = tmp_path / "sharded"
    sharded.mkdir()
    names = list(finetune_sd)
    halves = {"pytorch_model-00001-of-00002.bin": names[:10], "pytorch_model-00002-of-00002.bin": names[10:]}
    weight_map = {}
    for fname, keys in halves.items():
        torch.save({k: finetune_sd[k] for k in keys}, sharded / fname)
        weight_map.update({k: fname for k in keys})
    (sharded / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    ckpt = open_checkpoint(sharded)
    assert set(ckpt.tensors) == set(finetune_sd)
    for name in names:
        assert torch.equal(ckpt.read(name), finetune_sd[name])


def test_views_and_shared_storage(tmp_path):
    base = torch.arange(60, dtype=torch.float32).view(6, 10)
    sd = {"full": base, "t": base.t(), "slice": base[1:4, 2:7], "shared": base.view(-1)[5:25],
          "half": torch.randn(3, 4).half(), "bf": torch.randn(5).bfloat16(), "i64": torch.arange(3),
          "bool": torch.tensor([True, False]), "scalar": torch.tensor(3.5), "empty": torch.zeros(0, 4)}
    for container in ("zip", "legacy"):
        path = tmp_path / f"{container}.pth"
        torch.save(sd, path, _use_new_zipfile_serialization=(container == "zip"))
        ckpt = open_checkpoint(path)
        oracle = torch.load(path, weights_only=True)
        for name in sd:
            assert torch.equal(ckpt.read(name), oracle[name]), (container, name)
            assert ckpt.tensors[name].shape == tuple(oracle[name].shape)


def test_metadata_only_reads_no_tensor_data(tmp_path, monkeypatch):
    """open_checkpoint must not touch storage bytes: zero them after listing and the listing holds."""
    path = tmp_path / "x.pth"
    torch.save({"w": torch.ones(1000)}, path)
    calls = []
    monkeypatch.setattr("omgtool.formats.base.Checkpoint.read", lambda self, n: calls.append(n))
    ckpt = open_checkpoint(path)
    assert ckpt.tensors["w"].nbytes == 4000 and calls == []


# --- unreadable input: exit 2, one line -----------------------------------------------------

def _exit2(path, *needles):
    result = runner.invoke(app, ["inspect", str(path)])
    assert result.exit_code == 2, (result.exit_code, result.output)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {path}: "), result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert "Traceback" not in result.output
    with pytest.raises(UnreadableInput):
        open_checkpoint(path)


def test_truncated_zip(tmp_path):
    path = tmp_path / "t.pth"
    torch.save({"w": torch.ones(4000)}, path)
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    _exit2(path, "truncated: expected at least 16", f"file has {len(raw) // 2}", "inside member")


def test_corrupt_zip(tmp_path):
    path = tmp_path / "c.pth"
    torch.save({"w": torch.ones(10)}, path)
    raw = bytearray(path.read_bytes())
    central = raw.find(b"PK\x01\x02")
    raw[central:central + 4] = b"XXXX"  # break the first central directory entry
    path.write_bytes(bytes(raw))
    _exit2(path, "corrupt zip")


def test_missing_storage_member(tmp_path):
    pkl, _ = simple_state()
    path = write_torch_zip(tmp_path / "m.pth", pkl, {})
    _exit2(path, "storage member archive/data/0 is missing")


def test_storage_smaller_than_shape_needs(tmp_path):
    pkl = data_pkl({"w": tensor_entry("0", torch.FloatStorage, 4, (2, 3))})
    raw = torch.zeros(4).numpy().tobytes()
    path = write_torch_zip(tmp_path / "s.pth", pkl, {"0": raw})
    _exit2(path, "holds 4 elements", "needs 6")


def test_strided_view_past_storage(tmp_path):
    pkl = data_pkl({"w": tensor_entry("0", torch.FloatStorage, 10, (3, 3), stride=(4, 1), offset=1)})
    path = write_torch_zip(tmp_path / "v.pth", pkl, {"0": torch.zeros(10).numpy().tobytes()})
    _exit2(path, "needs 12")


def test_storage_member_size_mismatch(tmp_path):
    pkl, storages = simple_state()
    path = write_torch_zip(tmp_path / "z.pth", pkl, {"0": storages["0"][:-4]})
    _exit2(path, "holds 20 bytes", "says 24")


def test_compressed_storage(tmp_path):
    pkl, storages = simple_state()
    path = write_torch_zip(tmp_path / "d.pth", pkl, storages, compress_storages=True)
    _exit2(path, "compressed")


def test_hand_built_zip_reads_like_torch(tmp_path):
    pkl, storages = simple_state()
    path = write_torch_zip(tmp_path / "ok.pth", pkl, storages)
    assert torch.equal(open_checkpoint(path).read("w"), torch.load(path, weights_only=True)["w"])


def test_truncated_legacy(tmp_path):
    path = tmp_path / "l.pth"
    torch.save({"w": torch.ones(1000)}, path, _use_new_zipfile_serialization=False)
    raw = path.read_bytes()
    path.write_bytes(raw[:-100])
    _exit2(path, "truncated")


def test_not_a_checkpoint(tmp_path):
    path = tmp_path / "text.pth"
    path.write_text("hello")
    _exit2(path)
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    _exit2(empty, "empty")


def _safetensors(tmp_path) -> Path:
    path = tmp_path / "a.safetensors"
    save_file({"a": torch.ones(4, 4), "b": torch.zeros(3)}, path)
    return path


def _rewrite_header(path: Path, mutate) -> None:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    mutate(header)
    new = json.dumps(header).encode()
    new += b" " * (-len(new) % 8)
    path.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n:])


@pytest.mark.parametrize("case,needle", [
    ("huge_length", "exceeds"),
    ("bad_json", "invalid JSON"),
    ("overlap", "overlaps"),
    ("size", "need"),
    ("dtype", "unknown dtype"),
    ("truncated", "truncated"),
])
def test_bad_safetensors(tmp_path, case, needle):
    path = _safetensors(tmp_path)
    if case == "huge_length":
        raw = path.read_bytes()
        path.write_bytes(struct.pack("<Q", 1 << 40) + raw[8:])
    elif case == "bad_json":
        raw = path.read_bytes()
        (n,) = struct.unpack("<Q", raw[:8])
        path.write_bytes(raw[:8] + b"{" * n + raw[8 + n:])
    elif case == "overlap":
        _rewrite_header(path, lambda h: h["b"].update(data_offsets=[0, 12]))
    elif case == "size":
        _rewrite_header(path, lambda h: h["b"].update(shape=[5]))
    elif case == "dtype":
        _rewrite_header(path, lambda h: h["b"].update(dtype="F128"))
    elif case == "truncated":
        path.write_bytes(path.read_bytes()[:-8])
    _exit2(path, needle)


def test_missing_shard(tmp_path):
    folder = tmp_path / "base"
    shutil.copytree(BASE, folder)
    (folder / "model-00002-of-00002.safetensors").unlink()
    _exit2(folder, "shard model-00002-of-00002.safetensors", "missing")


def test_missing_path_and_empty_folder(tmp_path):
    _exit2(tmp_path / "nope.pth", "no such file")
    (tmp_path / "empty").mkdir()
    _exit2(tmp_path / "empty", "holds no model weights")


def test_debug_shows_traceback(tmp_path):
    path = tmp_path / "text.pth"
    path.write_text("hello")
    result = runner.invoke(app, ["--debug", "inspect", str(path)])
    assert result.exit_code == 2
    assert "Traceback" in result.stderr


def test_zip_member_offsets_use_local_header(tmp_path):
    """Local extra fields differ from the central directory's: the data offset must use the local one."""
    pkl, storages = simple_state()
    path = tmp_path / "extra.pth"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", pkl)
        info = zipfile.ZipInfo("archive/data/0")
        info.extra = b"\xfe\xca\x0c\x00" + b"\x00" * 12  # 16-byte local extra field
        zf.writestr(info, storages["0"])
    assert torch.equal(open_checkpoint(path).read("w"), torch.arange(6, dtype=torch.float32).view(2, 3))
