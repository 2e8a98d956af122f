"""Format readers and writers. `open_checkpoint` picks the reader from the path.

Files: torch zip (`torch.save`), legacy torch pickles, safetensors.
Folders: HF model folders (single file or sharded index, safetensors or
pytorch_model*.bin), PEFT adapter folders, DeepSpeed checkpoint folders.
"""

from __future__ import annotations

import struct
import zipfile
import zlib
from functools import lru_cache
from pathlib import Path

from omgtool.errors import UnreadableInput
from omgtool.formats.base import Checkpoint, SafetyReport, TensorInfo
from omgtool.formats.config_values import check_adapter_config, check_model_config
from omgtool.formats.jsonfile import parse_json, read_capped, read_json_object

__all__ = ["Checkpoint", "SafetyReport", "TensorInfo", "open_checkpoint", "open_file"]

HF_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
HF_SINGLE = ("model.safetensors", "pytorch_model.bin")
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")
DEEPSPEED_FILE = "mp_rank_00_model_states.pt"


def open_file(path: Path) -> Checkpoint:
    """Scan every pickle stream first (formats/scan.py), then read with the right reader."""
    from omgtool.formats.scan import current_policy, scan_file

    scanned = scan_file(path)
    if scanned.unsafe and current_policy().refuse:
        raise scanned.error()
    try:
        ckpt = _read_file(path, scanned.main_walk)
    except UnreadableInput:
        if not scanned.unsafe:
            raise
        ckpt = Checkpoint(path=path, format=scanned.kind, tensors={}, files=[path])
    if scanned.verdict != "not-a-pickle" or ckpt.safety.verdict != "not-a-pickle":
        ckpt.safety = scanned.report()
    return ckpt


def _read_file(path: Path, main_walk=None) -> Checkpoint:
    """Read one file; the reader is chosen by content (formats.sniff), not by the suffix.
    main_walk: the scanner's walk of a torch zip's data.pkl, (member name, WalkResult)."""
    from omgtool.formats.safetensors_file import read_safetensors
    from omgtool.formats.sniff import sniff
    from omgtool.formats.torch_file import read_torch_legacy, read_torch_zip

    try:
        kind = sniff(path)
        if kind == "json":  # a shape manifest ({format_version, tensors})
            from omgtool.formats.manifest import read_manifest

            return read_manifest(path)
        if kind == "torch-zip":
            return read_torch_zip(path, main_walk)
        reader = {"torch-legacy": read_torch_legacy, "safetensors": read_safetensors}[kind]
        return reader(path)
    except (FileNotFoundError, IsADirectoryError, PermissionError) as exc:
        raise UnreadableInput(exc.strerror or str(exc), path) from None
    except _INPUT_FAILURES as exc:  # the last guard: input that broke a library the reader uses
        raise UnreadableInput(f"unreadable ({type(exc).__name__}: {str(exc)[:200]})", path) from None


# What malformed bytes make Python's own parsers raise (zipfile, zlib, struct, codecs, deep or
# huge values); a reader that meets one unexpectedly still reports exit 2, not exit 4.
_INPUT_FAILURES = (RecursionError, MemoryError, OverflowError, NotImplementedError, EOFError,
                   UnicodeError, zipfile.BadZipFile, zlib.error, struct.error)


@lru_cache(maxsize=1)
def _family_files() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(adapter companions, projector-only files): family-specific folder files, as data in
    mappings/folders/family_files.toml (LLaVA's non_lora_trainables.bin and mm_projector.bin)."""
    import tomllib

    from omgtool.errors import InvalidArgument
    from omgtool.mappings_dir import mappings_dir

    path = mappings_dir() / "folders" / "family_files.toml"
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
        companions = tuple(str(c["file"]) for c in data.get("companions", []) if c.get("of") == "adapter")
        projector_only = tuple(str(c["file"]) for c in data.get("projector_only", []))
    except (OSError, KeyError, TypeError, AttributeError, tomllib.TOMLDecodeError) as exc:
        raise InvalidArgument(f"{path}: invalid folder mapping ({type(exc).__name__}: {exc})") from None
    return companions, projector_only


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
            companions = [path / c for c in _family_files()[0] if (path / c).is_file()]
            for extra in companions:
                _add_tensors(ckpt, open_file(extra), path)
            fmt = "peft-adapter" + "".join(f" + {c.name}" for c in companions)
            return _as_folder(ckpt, path, fmt, [path / adapter, *companions])
    for single in _family_files()[1]:
        if (path / single).is_file():
            return _as_folder(open_file(path / single), path, "projector-folder", [path / single])
    ds = _deepspeed_file(path)
    if ds is not None:
        ckpt = open_file(ds)
        return _as_folder(ckpt, path, "deepspeed", [ds])
    if (path / "saved_model.pb").is_file():
        raise UnreadableInput("not a checkpoint: looks like a TensorFlow SavedModel folder", path)
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
        try:
            tag = read_capped(latest, 4096).decode("utf-8").strip()
        except UnicodeDecodeError:
            raise UnreadableInput("'latest' is not a text file naming a checkpoint folder", path) from None
        if not tag or Path(tag).is_absolute() or ".." in Path(tag).parts or "\x00" in tag:
            raise UnreadableInput(f"'latest' names {tag[:60]!r}, not a folder inside {path.name}", path)
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
    checks = {"config.json": check_model_config, "adapter_config.json": check_adapter_config}
    for name, check in checks.items():
        if (folder / name).is_file():
            cfg = read_json_object(folder / name)
            problem = check(cfg)
            if problem:
                raise UnreadableInput(problem, folder)
            out[name.removesuffix(".json")] = cfg
    return out


def _read_index(folder: Path, index_path: Path) -> dict[str, str]:
    """The index's weight_map, every value a shard path that stays inside `folder`."""
    index = parse_json(read_capped(index_path), index_path.name, folder)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict):
        raise UnreadableInput(f"{index_path.name} is malformed (no weight_map object)", folder)
    root = folder.resolve()
    checked: set[str] = set()
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or not shard:
            raise UnreadableInput(f"{index_path.name}: {name} maps to {str(shard)[:40]!r}, not a file name", folder)
        if shard in checked:
            continue
        target = Path(shard)
        if target.is_absolute() or ".." in target.parts or "\x00" in shard:
            raise UnreadableInput(f"{index_path.name}: shard {shard!r} is not a path inside the folder", folder)
        try:
            inside = (folder / target).resolve().is_relative_to(root)
        except (OSError, RuntimeError, ValueError):
            inside = False
        if not inside:
            raise UnreadableInput(f"{index_path.name}: shard {shard!r} leads outside the folder "
                                  "(a symlink?)", folder)
        checked.add(shard)
    return weight_map


def _open_sharded(folder: Path, index_path: Path) -> Checkpoint:
    weight_map = _read_index(folder, index_path)
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
