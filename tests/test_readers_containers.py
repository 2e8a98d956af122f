"""Nested state dicts, bare tensors, file-kind sniffing and truncation, each checked against
torch's own loader (weights_only=True) as the oracle."""

from __future__ import annotations

import json
import struct
import zipfile

import pytest
import torch
from safetensors.torch import save_file

from omgtool.formats import open_checkpoint
from tests.cli_helpers import one_line_error, run
from tests.paths import PRETRAIN


def _flatten(obj, prefix=()):
    """Every tensor in a torch-loaded object with its dotted path (the oracle's view)."""
    if isinstance(obj, torch.Tensor):
        yield ".".join(prefix), obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _flatten(v, (*prefix, str(k)))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _flatten(v, (*prefix, str(i)))


def _pretrain_sd():
    return torch.load(PRETRAIN, weights_only=True)


@pytest.mark.parametrize("chain", [("model_state",), ("model_state_dict",), ("model", "state_dict"),
                                   ("state_dict",), ("module",), ("net",)])
def test_wrapped_state_dicts_are_found(tmp_path, chain):
    """Real published checkpoints (resemblyzer, chgnet, sevenn) nest the weights like this."""
    sd = _pretrain_sd()
    obj = sd
    for key in reversed(chain):
        obj = {key: obj, "epoch": 3}
    path = tmp_path / "wrapped.pt"
    torch.save(obj, path)
    loaded = torch.load(path, weights_only=True)
    inner = loaded
    for key in chain:
        inner = inner[key]
    ckpt = open_checkpoint(path)
    assert ckpt.container == ".".join(chain)
    assert list(ckpt.tensors) == list(inner)
    for name, tensor in inner.items():
        assert torch.equal(ckpt.read(name), tensor)
    report = json.loads(run("inspect", path, "--json").stdout)
    assert report["architecture"]["family"] == "omg-llava"
    assert report["num_tensors"] == len(inner) and "unexplained" not in report["groups"]


def test_largest_tensor_dict_without_a_known_wrapper(tmp_path):
    sd = _pretrain_sd()
    path = tmp_path / "odd.pt"
    torch.save({"checkpoint": {"weights_of_the_run": sd}, "misc": {"w": torch.ones(2)}}, path)
    ckpt = open_checkpoint(path)
    assert ckpt.container == "checkpoint.weights_of_the_run"
    assert set(sd) <= set(ckpt.tensors)
    assert ckpt.groups == {"misc.w": "extra"}
    assert torch.equal(ckpt.read("misc.w"), torch.ones(2))


def test_optimizer_and_scheduler_are_their_own_groups(tmp_path):
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    path = tmp_path / "train.pt"
    torch.save({"model_state_dict": model.state_dict(), "optimizer_state_dict": opt.state_dict(),
                "scheduler": {"last_epoch": 1, "warm": torch.tensor(0.5)}, "epoch": 1}, path)
    loaded = torch.load(path, weights_only=True)
    want = dict(_flatten(loaded))
    ckpt = open_checkpoint(path)
    assert ckpt.container == "model_state_dict"
    # model tensors relative to the state dict, everything else by its full dotted path
    expected = {k.removeprefix("model_state_dict."): v for k, v in want.items()}
    assert set(ckpt.tensors) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(ckpt.read(name), tensor), name
    assert {ckpt.groups[n] for n in ckpt.groups} == {"optimizer", "scheduler"}
    assert ckpt.groups["optimizer_state_dict.state.0.exp_avg"] == "optimizer"
    report = json.loads(run("inspect", path, "--json").stdout)
    assert report["groups"]["optimizer"] == sum(1 for n in want if n.startswith("optimizer"))
    assert report["groups"]["scheduler"] == 1
    assert report["metadata"]["epoch"] == 1


def test_tensors_in_lists_and_tuples(tmp_path):
    obj = {"layers": [torch.ones(2), (torch.zeros(3), {"deep": torch.arange(4)})], "name": "x"}
    path = tmp_path / "lists.pt"
    torch.save(obj, path)
    want = dict(_flatten(torch.load(path, weights_only=True)))
    ckpt = open_checkpoint(path)
    assert set(ckpt.tensors) == set(want) == {"layers.0", "layers.1.0", "layers.1.1.deep"}
    for name, tensor in want.items():
        assert torch.equal(ckpt.read(name), tensor)


def test_bare_tensor_file(tmp_path):
    t = torch.arange(12, dtype=torch.float16).view(3, 4)[:, 1:]
    for legacy in (False, True):
        path = tmp_path / f"bare{legacy}.pt"
        torch.save(t, path, _use_new_zipfile_serialization=not legacy)
        want = torch.load(path, weights_only=True)
        ckpt = open_checkpoint(path)
        assert list(ckpt.tensors) == ["tensor"]
        assert torch.equal(ckpt.read("tensor"), want)
        result = run("inspect", path, "--json")
        assert result.exit_code == 0 and json.loads(result.stdout)["num_tensors"] == 1


def test_shared_and_cyclic_references_visit_once(tmp_path):
    shared = {"w": torch.ones(2)}
    obj = {"a": shared, "b": shared, "c": [1]}
    obj["c"].append(obj["c"])  # a list that holds itself
    path = tmp_path / "shared.pt"
    torch.save(obj, path)
    torch.load(path, weights_only=True)
    ckpt = open_checkpoint(path)
    assert list(ckpt.tensors) == ["w"]
    assert run("inspect", path, "--json").exit_code == 0


# --- sniffing ------------------------------------------------------------------------------

FOREIGN = [
    ("model.gguf", b"GGUF\x03\x00\x00\x00" + b"\x00" * 64, "GGUF"),
    ("photo.jpg", b"\xff\xd8\xff\xe0\x00\x10JFIF" + b"\x00" * 64, "JPEG"),
    ("model.onnx", b"\x08\x07\x12\x07pytorch\x1a\x032.1" + b"\x00" * 32, "ONNX"),
    ("weights.h5", b"\x89HDF\r\n\x1a\n" + b"\x00" * 64, "HDF5"),
    ("arr.npy", b"\x93NUMPY\x01\x00v\x00{'descr': '<f4'}" + b" " * 40, "NumPy .npy"),
    ("model.tflite", b"\x1c\x00\x00\x00TFL3" + b"\x00" * 64, "TensorFlow Lite"),
    ("image.png", b"\x89PNG\r\n\x1a\n" + b"\x00" * 64, "PNG"),
    ("ckpt.pth.gz", b"\x1f\x8b\x08\x00" + b"\x00" * 64, "gzip"),
    ("model.safetensors", b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 12\n", "Git LFS"),
    ("model.bin", b"<!DOCTYPE html><html><body>404</body></html>", "HTML"),
    ("notes.pth", b"just some notes about the model\n", "text file"),
]


@pytest.mark.parametrize("name,raw,needle", FOREIGN)
def test_not_a_checkpoint_says_what_it_looks_like(tmp_path, name, raw, needle):
    path = tmp_path / name
    path.write_bytes(raw)
    result = run("inspect", path)
    one_line_error(result, 2, "not a checkpoint: looks like", needle)


def test_npz_and_plain_zip(tmp_path):
    import numpy as np

    npz = tmp_path / "arrays.npz"
    np.savez(npz, a=np.ones(3))
    one_line_error(run("inspect", npz), 2, "NumPy .npz")
    plain = tmp_path / "plain.pth"
    with zipfile.ZipFile(plain, "w") as zf:
        zf.writestr("readme.txt", "hi")
    one_line_error(run("inspect", plain), 2, "without data.pkl")


def test_keras_archive_and_savedmodel_folder(tmp_path):
    keras = tmp_path / "model.keras"
    with zipfile.ZipFile(keras, "w") as zf:
        zf.writestr("config.json", "{}")
        zf.writestr("model.weights.h5", b"\x89HDF\r\n\x1a\n")
    one_line_error(run("inspect", keras), 2, "Keras")
    saved = tmp_path / "saved"
    (saved / "variables").mkdir(parents=True)
    (saved / "saved_model.pb").write_bytes(b"\x08\x01\x12\x00")
    one_line_error(run("inspect", saved), 2, "TensorFlow SavedModel")


def test_tar_archive(tmp_path):
    import io
    import tarfile

    path = tmp_path / "bundle.pth"
    with tarfile.open(path, "w") as tar:
        info = tarfile.TarInfo("x.bin")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"abc"))
    one_line_error(run("inspect", path), 2, "tar")


def test_dispatch_by_content_not_extension(tmp_path):
    sd = {"w": torch.arange(6.0).view(2, 3)}
    zip_named_st = tmp_path / "really_a_zip.safetensors"
    torch.save(sd, zip_named_st)
    assert open_checkpoint(zip_named_st).format == "torch-zip"
    assert torch.equal(open_checkpoint(zip_named_st).read("w"), sd["w"])
    st_named_pth = tmp_path / "really_safetensors.pth"
    save_file(sd, st_named_pth)
    assert open_checkpoint(st_named_pth).format == "safetensors"
    legacy_named_bin = tmp_path / "legacy.safetensors"
    torch.save(sd, legacy_named_bin, _use_new_zipfile_serialization=False)
    assert open_checkpoint(legacy_named_bin).format == "torch-legacy"


def test_safetensors_with_header_of_128_bytes(tmp_path):
    """A header length of 128 starts the file with 0x80, the pickle protocol byte."""
    for pad in range(0, 200, 8):
        path = tmp_path / f"p{pad}.st"
        save_file({"a": torch.ones(2)}, path, metadata={"x": "y" * pad})
        (n,) = struct.unpack("<Q", path.read_bytes()[:8])
        if n == 128:
            assert open_checkpoint(path).format == "safetensors"
            return
    pytest.skip("no padding gave a 128-byte header")


# --- truncation ----------------------------------------------------------------------------

@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.9, 0.999])
def test_truncated_zip_says_expected_and_actual(tmp_path, fraction):
    path = tmp_path / "t.pth"
    torch.save({"a": torch.ones(3000), "b": torch.ones(500)}, path)
    full = path.stat().st_size
    cut = int(full * fraction)
    path.write_bytes(path.read_bytes()[:cut])
    with pytest.raises(Exception):
        torch.load(path, weights_only=True)
    result = run("inspect", path)
    one_line_error(result, 2, "truncated: expected at least", f"file has {cut}")
    expected = int(result.stderr.split("at least ")[1].split()[0])
    assert cut < expected <= full


def test_truncated_safetensors(tmp_path):
    path = tmp_path / "t.safetensors"
    save_file({"a": torch.ones(100)}, path)
    raw = path.read_bytes()
    path.write_bytes(raw[:-40])
    one_line_error(run("inspect", path), 2, f"truncated: expected {len(raw)} bytes, file has {len(raw) - 40}")
    path.write_bytes(raw[:20])
    one_line_error(run("inspect", path), 2, "truncated: expected at least")
