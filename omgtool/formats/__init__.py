"""Format readers and writers. `open_checkpoint` picks the reader from the path.

Files: torch zip (`torch.save`), legacy torch pickles, safetensors.
Folders: HF model folders (single file or sharded index, safetensors or
pytorch_model*.bin), PEFT adapter folders, DeepSpeed checkpoint folders.
"""

from __future__ import annotations

import json
from pathlib import Path

from omgtool.errors import UnreadableInput
from omgtool.formats.base import Checkpoint, SafetyReport, TensorInfo
from omgtool.formats.jsonfile import read_json_object

__all__ = ["Checkpoint", "SafetyReport", "TensorInfo", "open_checkpoint", "open_file"]

HF_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
HF_SINGLE = ("model.safetensors", "pytorch_model.bin")
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")
# LLaVA: a LoRA run keeps the non-LoRA trained weights (the projector) beside the adapter;
# a stage-1 (projector alignment) run folder holds only mm_projector.bin.
ADAPTER_COMPANIONS = ("non_lora_trainables.bin",)
PROJECTOR_ONLY = ("mm_projector.bin",)
DEEPSPEED_FILE = "mp_rank_00_model_states.pt"


def open_file(path: Path) -> Checkpoint:
    """Scan every pickle stream first (formats/scan.py), then read with the right reader."""
    from omgtool.formats.scan import current_policy, scan_file

    scanned = scan_file(path)
    if scanned.unsafe and current_policy().refuse:
        raise scanned.error()
    try:
        ckpt = _read_file(path)
    except UnreadableInput:
        if not scanned.unsafe:
            raise
        ckpt = Checkpoint(path=path, format=scanned.kind, tensors={}, files=[path])
    if scanned.verdict != "not-a-pickle" or ckpt.safety.verdict != "not-a-pickle":
        ckpt.safety = scanned.report()
    return ckpt


def _read_file(path: Path) -> Checkpoint:
    from omgtool.formats.safetensors_file import read_safetensors
    from omgtool.formats.torch_file import is_zip, read_torch_legacy, read_torch_zip

    try:
        if path.stat().st_size == 0:
            raise UnreadableInput("file is empty", path)
        if path.suffix == ".safetensors":
            return read_safetensors(path)
        if path.suffix.lower() == ".json":  # a shape manifest ({format_version, tensors})
            from omgtool.formats.manifest import read_manifest

            return read_manifest(path)
        if is_zip(path):
            return read_torch_zip(path)
        with open(path, "rb") as fh:
            first = fh.read(2)
        if first[:1] == b"\x80":
            return read_torch_legacy(path)
        if len(first) == 2 and first != b"PK":  # safetensors without the suffix: 8-byte length
            return read_safetensors(path)
        raise UnreadableInput("not a recognised checkpoint format", path)
    except (FileNotFoundError, IsADirectoryError, PermissionError) as exc:
        raise UnreadableInput(exc.strerror or str(exc), path) from None


def open_checkpoint(path: str | Path, allow_globals=None, refuse_unsafe: bool | None = None) -> Checkpoint:
    """Open a checkpoint file or folder. Reads metadata only; no pickle code runs.

    allow_globals: `module.name` globals graded unknown that the caller trusts; refuse_unsafe:
    raise UnsafeInput for an unknown/dangerous pickle (default), or return it with the
    tensors listed from the opcode walk. Both default to the current `scan_policy`."""
    from omgtool.formats.scan import scan_policy

    path = Path(path)
    if not path.exists():
        raise UnreadableInput("no such file or folder", path)
    with scan_policy(allow_globals, refuse_unsafe):
        if path.is_dir():
            return _open_folder(path)
        return open_file(path)


def _open_folder(path: Path) -> Checkpoint:
    for index_name in HF_INDEXES:
        if (path / index_name).is_file():
            return _open_sharded(path, path / index_name)
    for single in HF_SINGLE:
        if (path / single).is_file():
            ckpt = open_file(path / single)
            return _as_folder(ckpt, path, "hf-folder", [path / single])
    for adapter in ADAPTER_FILES:
        if (path / adapter).is_file():
            ckpt = open_file(path / adapter)
            companions = [path / c for c in ADAPTER_COMPANIONS if (path / c).is_file()]
            for extra in companions:
                _add_tensors(ckpt, open_file(extra), path)
            fmt = "peft-adapter" + "".join(f" + {c.name}" for c in companions)
            return _as_folder(ckpt, path, fmt, [path / adapter, *companions])
    for single in PROJECTOR_ONLY:
        if (path / single).is_file():
            return _as_folder(open_file(path / single), path, "projector-folder", [path / single])
    ds = _deepspeed_file(path)
    if ds is not None:
        ckpt = open_file(ds)
        return _as_folder(ckpt, path, "deepspeed", [ds])
    raise UnreadableInput("folder holds no model weights (no model.safetensors[.index.json], "
                          "pytorch_model*.bin, adapter_model.*, mm_projector.bin, or DeepSpeed "
                          "mp_rank_00_model_states.pt)",
                          path)


def _add_tensors(ckpt: Checkpoint, extra: Checkpoint, folder: Path) -> None:
    """Present `extra`'s tensors (names unchanged) beside `ckpt`'s; merge safety and metadata."""
    clash = sorted(set(ckpt.tensors) & set(extra.tensors))
    if clash:
        raise UnreadableInput(f"{extra.path.name} holds tensors the adapter also holds: {', '.join(clash[:3])}",
                              folder)
    ckpt.tensors = {**ckpt.tensors, **extra.tensors}
    from omgtool.formats.scan import merge_safety

    merge_safety(ckpt.safety, extra.safety)
    if extra.metadata:
        ckpt.metadata = {**ckpt.metadata, extra.path.name: extra.metadata}


def _deepspeed_file(path: Path) -> Path | None:
    if (path / DEEPSPEED_FILE).is_file():
        return path / DEEPSPEED_FILE
    latest = path / "latest"
    if latest.is_file():
        tag = latest.read_text().strip()
        candidate = path / tag / DEEPSPEED_FILE
        if not candidate.is_file():
            raise UnreadableInput(f"'latest' names {tag} but {tag}/{DEEPSPEED_FILE} is missing", path)
        return candidate
    found = sorted(path.glob(f"*/{DEEPSPEED_FILE}"))
    return found[-1] if len(found) == 1 else None


def _as_folder(ckpt: Checkpoint, folder: Path, fmt: str, files: list[Path]) -> Checkpoint:
    ckpt.metadata = {**ckpt.metadata, **_folder_configs(folder)}
    ckpt.path = folder
    ckpt.format = fmt if fmt != "hf-folder" else f"hf-folder ({ckpt.format})"
    ckpt.files = files
    return ckpt


def _folder_configs(folder: Path) -> dict:
    out = {}
    for name in ("config.json", "adapter_config.json"):
        if (folder / name).is_file():
            out[name.removesuffix(".json")] = read_json_object(folder / name)
    return out


def _open_sharded(folder: Path, index_path: Path) -> Checkpoint:
    try:
        index = json.loads(index_path.read_text())
        weight_map: dict[str, str] = index["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise UnreadableInput(f"{index_path.name} is malformed ({exc})", folder) from None
    shards: dict[str, Checkpoint] = {}
    for shard in dict.fromkeys(weight_map.values()):
        shard_path = folder / shard
        if not shard_path.is_file():
            raise UnreadableInput(f"shard {shard} named in {index_path.name} is missing", folder)
        shards[shard] = open_file(shard_path)
    tensors: dict[str, TensorInfo] = {}
    safety = SafetyReport(verdict="not-a-pickle")
    for name, shard in weight_map.items():
        info = shards[shard].tensors.get(name)
        if info is None:
            raise UnreadableInput(f"{name} is mapped to {shard} but that shard does not hold it", folder)
        tensors[name] = info
    from omgtool.formats.scan import merge_safety

    for ckpt in shards.values():
        merge_safety(safety, ckpt.safety)
    inner = next(iter(shards.values())).format if shards else "safetensors"
    return Checkpoint(path=folder, format=f"hf-folder ({inner}, {len(shards)} shards)", tensors=tensors,
                      safety=safety, metadata=_folder_configs(folder), files=[folder / s for s in shards])
