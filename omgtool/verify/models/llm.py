"""Build the language model as a transformers LlamaForCausalLM, never through remote code.

- A Llama-layout folder (`omgtool export --to llama`) loads with `from_pretrained`.
- An InternLM2 folder (the base, or `merge-lora` output) is converted in memory with the
  export mapping (`omgtool.arch.convert`: plan_conversion + iter_converted + llama_config_dict)
  into a LlamaForCausalLM built on the meta device and filled tensor by tensor.

Placement: everything on one device, or `device_map` placement through accelerate's own
engine (`infer_auto_device_map` + `dispatch_model` for in-memory models; transformers'
`from_pretrained(device_map=...)` for Llama folders), with `max_memory` limits and disk
offload into `offload_folder`.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch

from omgtool.errors import InvalidArgument, MismatchError, UnreadableInput
from omgtool.formats.jsonfile import read_json_object

NO_SPLIT = ["LlamaDecoderLayer"]


@dataclass
class Placement:
    device: str = "cpu"  # the execution device: cpu, cuda, cuda:1
    device_map: str | dict | None = None  # None: all on `device`; "auto" or a dict: accelerate
    max_memory: dict | None = None  # {0: bytes, "cpu": bytes}
    offload_folder: str | None = None  # parent of the per-model offload folders
    scratch: list[str] = field(default_factory=list)

    def new_offload_dir(self) -> str:
        """A fresh folder per model (accelerate reuses an existing index.json it finds)."""
        if self.offload_folder:
            Path(self.offload_folder).mkdir(parents=True, exist_ok=True)
        path = tempfile.mkdtemp(prefix="omgtool-offload-", dir=self.offload_folder)
        self.scratch.append(path)
        return path

    def cleanup(self) -> None:
        import shutil

        for path in self.scratch:
            shutil.rmtree(path, ignore_errors=True)
        self.scratch.clear()

    def describe(self) -> str:
        if self.device_map is None:
            return self.device
        limits = f", max_memory {self.max_memory}" if self.max_memory else ""
        return f"device_map={self.device_map if isinstance(self.device_map, str) else 'custom'}{limits}"


@dataclass
class LLMInfo:
    folder: str
    layout: str  # "llama" | "internlm2"
    built_with: str
    dtype: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    stored_dtypes: dict[str, int]
    device_map: dict | None = None
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def read_config(folder: Path) -> dict:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise UnreadableInput("no config.json in the model folder", folder)
    return read_json_object(path)


def detect_layout(folder: Path, ckpt=None) -> str:
    """'internlm2' or 'llama', from config.json, else from the weight names."""
    from omgtool.arch.convert import architecture_of

    cfg = read_config(folder)
    layout = architecture_of(cfg, ckpt)
    if layout in ("internlm2", "llama"):
        return layout
    raise InvalidArgument(f"cannot tell the model layout of {folder} (model_type {cfg.get('model_type')!r}); "
                          "expected an InternLM2 or Llama folder")


def llama_source(folder: Path, ckpt, conversion=None):
    """(llama config dict, params, planned pieces or None) for an InternLM2 or Llama folder."""
    from omgtool.arch.convert import conversion_between, head_params, llama_config_dict, plan_conversion

    src = read_config(folder)
    layout = detect_layout(folder, ckpt)
    params = head_params(src)
    if layout == "llama":
        return layout, dict(src), params, None
    conversion = conversion or conversion_between(layout, "llama")
    pieces, uncovered = plan_conversion(ckpt, conversion, params)
    if uncovered:
        raise MismatchError(f"{len(uncovered)} weights have no InternLM2->Llama rule (e.g. {uncovered[0]})",
                            folder)
    return layout, llama_config_dict(src, conversion), params, pieces


def llama_tensors(ckpt, pieces, params) -> Iterator[tuple[str, torch.Tensor]]:
    """(Llama name, tensor in its stored dtype) for a folder; converted when `pieces` is given."""
    if pieces is None:
        for name in ckpt.tensors:
            yield name, ckpt.read(name)
        return
    from omgtool.arch.convert import iter_converted

    yield from iter_converted(ckpt, pieces, params)


def build_llama(config: dict[str, Any], tensors: Iterable[tuple[str, torch.Tensor]], dtype: torch.dtype,
                placement: Placement, prepare: Callable | None = None):
    """A LlamaForCausalLM from (name, tensor) pairs; `prepare(model)` may wrap it (PEFT) before placement.

    Returns (model or wrapper, the device map used or None).
    """
    from accelerate import init_empty_weights
    from accelerate.utils import set_module_tensor_to_device
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = dict(config)
    cfg["dtype"] = str(dtype).removeprefix("torch.")
    llama_config = LlamaConfig.from_dict(cfg)
    with init_empty_weights():
        model = LlamaForCausalLM(llama_config)
    stage_device = placement.device if placement.device_map is None else "cpu"
    expected = dict(model.named_parameters())
    seen = set()
    for name, tensor in tensors:
        if name not in expected:
            raise MismatchError(f"weight {name} has no place in LlamaForCausalLM")
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise MismatchError(f"{name} is {list(tensor.shape)} but the config makes it "
                                f"{list(expected[name].shape)}")
        value = tensor.to(stage_device, non_blocking=True).to(dtype)
        set_module_tensor_to_device(model, name, stage_device, value=value, dtype=dtype)
        seen.add(name)
    missing = [n for n in expected if n not in seen]
    if missing:
        raise MismatchError(f"{len(missing)} weights missing for LlamaForCausalLM (e.g. {missing[0]})")
    model.to(stage_device)  # buffers (rotary inverse frequencies)
    model.eval()
    wrapped = prepare(model) if prepare is not None else model
    device_map = place(model, placement, dtype)
    return wrapped, device_map


def place(model, placement: Placement, dtype: torch.dtype) -> dict | None:
    """Put an in-memory model where `placement` says, through accelerate (no home-made sharding)."""
    if placement.device_map is None:
        model.to(placement.device)
        return None
    from accelerate import dispatch_model, infer_auto_device_map

    if isinstance(placement.device_map, dict):
        device_map = dict(placement.device_map)
    else:
        device_map = dict(infer_auto_device_map(model, max_memory=placement.max_memory,
                                                no_split_module_classes=NO_SPLIT, dtype=dtype))
    devices = set(device_map.values())
    if devices == {"disk"}:
        raise InvalidArgument("the max_memory limits leave no room for any layer in memory "
                              "(everything would be offloaded to disk); raise --max-memory")
    offload = placement.new_offload_dir() if "disk" in devices else None
    main = "cpu" if devices <= {"cpu", "disk"} else None  # else accelerate's first accelerator
    dispatch_model(model, device_map, main_device=main, offload_dir=offload)
    return device_map


def load_llama_folder(folder: Path, dtype: torch.dtype, placement: Placement):
    """A Llama export through transformers' own from_pretrained (device_map engine when asked)."""
    from transformers import LlamaForCausalLM

    kwargs: dict[str, Any] = {"dtype": dtype}
    if placement.device_map is None:
        kwargs["device_map"] = {"": placement.device}
    else:
        kwargs["device_map"] = placement.device_map
        if placement.max_memory:
            kwargs["max_memory"] = placement.max_memory
        kwargs["offload_folder"] = placement.new_offload_dir()
    model = LlamaForCausalLM.from_pretrained(str(folder), **kwargs)
    model.eval()
    return model, getattr(model, "hf_device_map", None)


def load_llm(folder: str | Path, dtype: torch.dtype, placement: Placement):
    """(model, LLMInfo) for a merged InternLM2 folder or a Llama export."""
    from collections import Counter

    from omgtool.formats import open_checkpoint

    folder = Path(folder)
    ckpt = open_checkpoint(folder)
    layout, config, params, pieces = llama_source(folder, ckpt)
    if layout == "llama":
        model, device_map = load_llama_folder(folder, dtype, placement)
        built = "transformers LlamaForCausalLM.from_pretrained"
    else:
        model, device_map = build_llama(config, llama_tensors(ckpt, pieces, params), dtype, placement)
        built = "InternLM2 converted in memory (mappings/conv_internlm2_to_llama.toml) into LlamaForCausalLM"
    cfg = model.config
    info = LLMInfo(folder=str(folder), layout=layout, built_with=built, dtype=str(dtype).removeprefix("torch."),
                   vocab_size=int(cfg.vocab_size), hidden_size=int(cfg.hidden_size),
                   num_layers=int(cfg.num_hidden_layers),
                   stored_dtypes=dict(Counter(t.dtype for t in ckpt.tensors.values())),
                   device_map=_short_map(device_map))
    return model, info


def _short_map(device_map: dict | None) -> dict | None:
    if not device_map:
        return None
    return {k or "(all)": str(v) for k, v in device_map.items()}


def input_device(model, placement: Placement):
    """Where input ids / embeddings go: the embedding table's execution device."""
    if placement.device_map is None:
        return torch.device(placement.device)
    emb = model.get_input_embeddings()
    hook = getattr(emb, "_hf_hook", None)
    if hook is not None and getattr(hook, "execution_device", None) is not None:
        return torch.device(hook.execution_device)
    dev = emb.weight.device
    return torch.device("cpu") if dev.type == "meta" else dev
