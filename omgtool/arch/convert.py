"""Layout conversions, driven by `mappings/conv_<source>_to_<target>.toml`.

Which conversion applies is chosen by the (source architecture, target) pair; the source
architecture is read from config.json (`model_types` / `hf_architectures` of the
architecture mappings), else from which architecture's embedding-role weight the tensors
hold. Shared by `export --to llama` (streamed to disk) and `verify` (built in memory): one
plan of target tensors, one config translation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

from omgtool.arch.mapping import ConversionMapping, Registry, Template, load_registry
from omgtool.errors import InvalidArgument
from omgtool.formats.base import Checkpoint
from omgtool.kernels.transforms import TRANSFORMS, apply, transform_shapes
from omgtool.plan.model import PlannedTensor, Source


@dataclass(frozen=True)
class ConvertedName:
    source: str
    targets: tuple[str, ...]
    transform: str


def _fill(template: str, layer: str | None) -> str:
    return template.replace("{layer}", layer) if layer is not None else template


def convert_name(conversion: ConversionMapping, name: str) -> ConvertedName | None:
    """Which target name(s) and transform a source weight name maps to; None if no rule."""
    for rule in conversion.rules:
        m = Template(rule.source).match(name)
        if m is None:
            continue
        layer = m.layer
        targets = rule.target if isinstance(rule.target, list) else [rule.target]
        if rule.transform not in TRANSFORMS:
            raise InvalidArgument(f"conversion {conversion.name}: unknown transform {rule.transform!r}")
        return ConvertedName(name, tuple(_fill(t, layer) for t in targets), rule.transform)
    return None


def architecture_of(config: dict[str, Any] | None, ckpt: Checkpoint | None = None,
                    registry: Registry | None = None) -> str | None:
    """The architecture mapping a model folder is in, or None."""
    registry = registry or load_registry()
    config = config if isinstance(config, dict) else {}
    kind = str(config.get("model_type", "")).lower()
    hf = set(config.get("architectures") or [])
    for arch in registry.architectures.values():
        if kind and kind in arch.model_types or hf & set(arch.hf_architectures):
            return arch.name
    if ckpt is not None:
        for arch in registry.architectures.values():
            emb = arch.weight_with_role("embedding")
            if emb is not None and emb.name in ckpt.tensors:
                return arch.name
    return None


def conversion_between(source: str, target: str, registry: Registry | None = None) -> ConversionMapping:
    return (registry or load_registry()).conversion(source, target)


def conversion_for(config: dict[str, Any], target: str, ckpt: Checkpoint | None = None) -> ConversionMapping:
    """The conversion from a folder's architecture (config.json, else its weights) to `target`."""
    source = architecture_of(config, ckpt)
    if source is None:
        raise InvalidArgument(f"cannot tell the architecture of the folder (model_type "
                              f"{config.get('model_type')!r}): no architecture mapping claims it")
    return conversion_between(source, target)


def role_target(conversion: ConversionMapping, role: str, registry: Registry | None = None) -> str:
    """The target architecture's weight name with `role` ("embedding", "head")."""
    arch = (registry or load_registry()).architecture(conversion.target)
    spec = arch.weight_with_role(role)
    if spec is None:
        raise InvalidArgument(f"architecture {arch.name} names no {role} weight (role = \"{role}\")")
    return spec.name


def head_params(config: dict[str, Any]) -> dict[str, int]:
    """num_heads, num_kv_heads, head_dim from an InternLM2 (or Llama) config.json."""
    try:
        heads = int(config["num_attention_heads"])
        kv = int(config.get("num_key_value_heads") or heads)
        head_dim = int(config.get("head_dim") or int(config["hidden_size"]) // heads)
    except (KeyError, TypeError, ValueError) as exc:
        raise InvalidArgument(f"config.json lacks the attention sizes ({exc})") from None
    return {"num_heads": heads, "num_kv_heads": kv, "head_dim": head_dim}


def plan_conversion(ckpt: Checkpoint, conversion: ConversionMapping, params: dict[str, int],
                    dtype: str | None = None, input_name: str = "src") -> tuple[list[PlannedTensor], list[str]]:
    """(target tensors in source order, "transform" kernel; source names no rule covers)."""
    pieces: list[PlannedTensor] = []
    uncovered: list[str] = []
    for name, info in ckpt.tensors.items():
        conv = convert_name(conversion, name)
        if conv is None:
            uncovered.append(name)
            continue
        shapes = transform_shapes(conv.transform, info.shape, params)
        for i, (target, shape) in enumerate(zip(conv.targets, shapes)):
            pieces.append(PlannedTensor(target, tuple(shape), dtype or info.dtype, (Source(input_name, name),),
                                        "transform", conv.transform, {"index": i, "heads": params},
                                        action="split" if conv.transform != "identity" else "renamed"))
    return pieces, uncovered


def iter_converted(ckpt: Checkpoint, pieces: list[PlannedTensor], params: dict[str, int]) -> Iterator[tuple[str, Any]]:
    """Yield (target name, tensor) in plan order, reading each source tensor once (in memory:
    verify builds a model from it)."""
    from omgtool.formats.dtypes import torch_dtype

    current, outputs = None, None
    for piece in pieces:
        source = piece.sources[0].key
        if source != current:
            current = source
            outputs = apply(piece.transform, ckpt.read(source), params)
        yield piece.name, outputs[piece.params["index"]].to(torch_dtype(piece.dtype))


# InternLM2Config's default when config.json has no rope_theta.
INTERNLM2_ROPE_THETA = 10000.0


def rope_settings(src: dict[str, Any]) -> dict[str, Any]:
    """The rope base and scaling of an InternLM2 config in every form a Llama reader looks for:
    top-level `rope_theta` + `rope_scaling` (transformers 4.x, llama.cpp's converters) and
    `rope_parameters` (transformers 5.x). A 4.x reader that finds no `rope_theta` silently uses
    10000, so the base is always written out."""
    theta = src.get("rope_theta", INTERNLM2_ROPE_THETA)
    scaling = src.get("rope_scaling")
    out: dict[str, Any] = {"rope_theta": theta}
    if isinstance(scaling, dict):
        scaling = dict(scaling)
        kind = scaling.pop("rope_type", None) or scaling.pop("type", None)
        scaling.pop("type", None)
        out["rope_scaling"] = {"type": kind, "rope_type": kind, **scaling}
        out["rope_parameters"] = {"rope_type": kind, "rope_theta": theta, **scaling}
    else:
        out["rope_scaling"] = None
        out["rope_parameters"] = {"rope_type": "default", "rope_theta": theta}
    return out


def llama_config_dict(src: dict[str, Any], conversion: ConversionMapping, *, vocab_size: int | None = None,
                      dtype: str | None = None, name: str | None = None) -> dict[str, Any]:
    """The InternLM2 config rewritten for LlamaForCausalLM. The installed transformers'
    LlamaConfig fills in the Llama fields; the rope settings and the dtype are then written in
    both the 4.x and the 5.x form, so either major version (and llama.cpp) reads the same model.
    `name` becomes `_name_or_path` (llama.cpp's converter takes general.name from it)."""
    from transformers import LlamaConfig

    cfg = {k: v for k, v in src.items() if k not in conversion.config.drop}
    for old, new in conversion.config.rename.items():
        if old in cfg:
            cfg[new] = cfg.pop(old)
    cfg.update(conversion.config.set)
    if vocab_size is not None:
        cfg["vocab_size"] = vocab_size
    params = head_params(src)
    cfg["head_dim"] = params["head_dim"]
    rope = cfg.pop("rope_scaling", None)
    if isinstance(rope, dict):
        rope = dict(rope)
        rope["rope_type"] = rope.pop("type", rope.get("rope_type"))
        cfg["rope_scaling"] = rope
    torch_dtype = cfg.pop("torch_dtype", None)
    if dtype or torch_dtype:
        cfg["dtype"] = dtype or torch_dtype
    model_type = cfg.pop("model_type", None)
    config = LlamaConfig(**cfg)
    out = config.to_dict()
    out["model_type"] = model_type or conversion.target
    out.update(rope_settings(src))
    config_dtype = out.get("dtype") or out.get("torch_dtype")
    if config_dtype:
        out["dtype"] = out["torch_dtype"] = str(config_dtype).removeprefix("torch.")  # < 4.56 reads torch_dtype
    if name:
        out["_name_or_path"] = name
    return out
