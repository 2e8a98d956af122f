"""InternLM2 -> Llama, driven by `mappings/conv_internlm2_to_llama.toml`.

Shared by `export --to llama` (streamed to disk) and `verify` (built in memory):
one plan of target tensors, one config translation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

from omgtool.errors import InvalidArgument
from omgtool.formats.base import Checkpoint
from omgtool.arch.mapping import ConversionMapping, load_registry
from omgtool.kernels.transforms import apply, convert_name, transform_shapes


@dataclass(frozen=True)
class PlannedPiece:
    target: str
    source: str
    transform: str
    index: int  # which output of the transform
    shape: tuple[int, ...]
    dtype: str


def internlm2_to_llama() -> ConversionMapping:
    return load_registry().conversion("internlm2", "llama")


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
                    dtype: str | None = None) -> tuple[list[PlannedPiece], list[str]]:
    """(pieces in source order, source names no rule covers)."""
    pieces: list[PlannedPiece] = []
    uncovered: list[str] = []
    for name, info in ckpt.tensors.items():
        conv = convert_name(conversion, name)
        if conv is None:
            uncovered.append(name)
            continue
        shapes = transform_shapes(conv.transform, info.shape, params)
        for i, (target, shape) in enumerate(zip(conv.targets, shapes)):
            pieces.append(PlannedPiece(target, name, conv.transform, i, shape, dtype or info.dtype))
    return pieces, uncovered


def iter_converted(ckpt: Checkpoint, pieces: list[PlannedPiece], params: dict[str, int]) -> Iterator[tuple[str, Any]]:
    """Yield (target name, tensor) in plan order, reading each source tensor once."""
    from omgtool.formats.dtypes import torch_dtype

    current, outputs = None, None
    for piece in pieces:
        if piece.source != current:
            current = piece.source
            outputs = apply(piece.transform, ckpt.read(piece.source), params)
        yield piece.target, outputs[piece.index].to(torch_dtype(piece.dtype))


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
    out["model_type"] = model_type or "llama"
    out.update(rope_settings(src))
    config_dtype = out.get("dtype") or out.get("torch_dtype")
    if config_dtype:
        out["dtype"] = out["torch_dtype"] = str(config_dtype).removeprefix("torch.")  # < 4.56 reads torch_dtype
    if name:
        out["_name_or_path"] = name
    return out
