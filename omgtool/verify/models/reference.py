"""The unmerged reference: base LLM + the adapter checkpoint through PEFT's own LoRA layers.

The base folder (InternLM2, converted in memory, or Llama) becomes a LlamaForCausalLM;
the checkpoint's trained full weights (tok_embeddings / output after the vocab resize)
replace the base's; every LoRA pair becomes a PEFT LoRA module on the Llama layout. A
LoRA on InternLM2's fused wqkv is split the way the weight is: rows (B) by the grouped
q/k/v layout of the conversion mapping, A shared by q, k and v; the scale is PEFT's own
(LoraConfig(r, lora_alpha, rank_pattern, use_rslora)); the report's figure comes from
omgtool.kernels.lora.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from omgtool.errors import InvalidArgument, MismatchError
from omgtool.verify.models.llm import Placement, build_llama, llama_source, llama_tensors


@dataclass
class ReferenceInfo:
    base: str
    base_layout: str
    adapter: str
    alpha: float | None
    alpha_source: str
    rank: int | None
    scale: float | None
    lora_modules: int
    lora_pairs: int
    replaced: list[str]
    vocab_size: int
    built_with: str = "PEFT LoraConfig/get_peft_model on transformers LlamaForCausalLM (unmerged)"
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class AdapterParts:
    overrides: dict[str, torch.Tensor]  # llama name -> trained full weight
    lora: dict[str, tuple[torch.Tensor, torch.Tensor]]  # llama module name -> (A, B)
    alpha: float | None
    alpha_source: str
    pairs: int


def adapter_parts(adapter_ckpt, analysis, params: dict[str, int], conversion=None) -> AdapterParts:
    """The adapter's LLM pieces in Llama names: full weights to replace, LoRA factors per module."""
    from omgtool.arch.convert import conversion_between, convert_name
    from omgtool.kernels.transforms import apply

    if analysis.family is None:
        raise InvalidArgument("the adapter checkpoint's family is unknown (no mapping explains its keys)")
    llm = analysis.family.language_model
    if llm is None:
        raise InvalidArgument(f"family {analysis.family.name} has no language model component")

    def llama_names(weight: str, tensor):
        if llm.architecture == "llama":
            return [(weight, tensor)]
        conv = convert_name(conversion or conversion_between(llm.architecture, "llama"), weight)
        if conv is None:
            raise MismatchError(f"adapter weight {weight} has no {llm.architecture}->llama rule")
        return list(zip(conv.targets, apply(conv.transform, tensor, params)))

    overrides: dict[str, torch.Tensor] = {}
    for m in analysis.matches.values():
        if m.component == llm.name and m.role == "weight":
            for name, t in llama_names(m.weight, adapter_ckpt.read(m.key)):
                overrides[name] = t
    lora: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    pairs = [p for p in analysis.lora_pairs if p.component == llm.name]
    for p in pairs:
        a, b = adapter_ckpt.read(p.a_key), adapter_ckpt.read(p.b_key)
        if a.shape[0] != b.shape[1]:
            raise MismatchError(f"LoRA rank mismatch: {p.a_key} has {a.shape[0]} rows, {p.b_key} "
                                f"{b.shape[1]} columns")
        for name, b_part in llama_names(p.weight, b):  # rows of B follow the weight's split
            lora[name.removesuffix(".weight")] = (a, b_part)
    lora_info = analysis.architecture.get("lora") or {}
    return AdapterParts(overrides, lora, lora_info.get("alpha"), lora_info.get("alpha_source", ""), len(pairs))


def build_reference(base_folder: str | Path, adapter_ckpt, analysis, dtype: torch.dtype,
                    placement: Placement, alpha: float | None = None, base_view=None):
    """(PEFT model, ReferenceInfo). `alpha` overrides the analysis' alpha (mapping default);
    `base_view(ckpt)` may replace the base's tensors as read (verify --reference nf4)."""
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    from omgtool.arch.mapping import load_registry
    from omgtool.formats import open_checkpoint
    from omgtool.arch.infer import adapter_settings
    from omgtool.kernels.lora import scaling

    base_folder = Path(base_folder)
    base = open_checkpoint(base_folder)
    if base_view is not None:
        base = base_view(base)
    layout, config, params, pieces = llama_source(base_folder, base)
    parts = adapter_parts(adapter_ckpt, analysis, params)
    alpha_used = float(alpha) if alpha is not None else parts.alpha
    source = "user (--alpha)" if alpha is not None else parts.alpha_source
    if parts.lora and alpha_used is None:
        raise InvalidArgument(f"LoRA alpha unknown ({source}); pass --alpha")
    config = dict(config)
    llama = load_registry().architecture("llama")
    emb_name, head_name = llama.weight_with_role("embedding").name, llama.weight_with_role("head").name
    emb = parts.overrides.get(emb_name)
    head = parts.overrides.get(head_name)
    if emb is not None or head is not None:
        rows = {t.shape[0] for t in (emb, head) if t is not None}
        if len(rows) > 1:
            raise MismatchError(f"adapter embeddings and head disagree on the vocab: {sorted(rows)}")
        config["vocab_size"] = rows.pop()
    vocab = int(config["vocab_size"])

    def tensors():
        pending = dict(parts.overrides)
        for name, t in llama_tensors(base, pieces, params):
            if name in (emb_name, head_name) and name not in pending \
                    and t.shape[0] != vocab:
                raise MismatchError(f"base {name} has {t.shape[0]} rows, the adapter's vocab is {vocab}, "
                                    "and the adapter does not carry this table")
            yield name, pending.pop(name, t)
        yield from pending.items()

    ranks = Counter(a.shape[0] for a, _ in parts.lora.values())
    rank = ranks.most_common(1)[0][0] if ranks else None
    settings = adapter_settings(adapter_ckpt)

    def prepare(model):
        if not parts.lora:
            return model
        cfg = LoraConfig(r=rank, lora_alpha=alpha_used, lora_dropout=0.0, bias="none",
                         target_modules=sorted(parts.lora), use_rslora=settings.use_rslora,
                         rank_pattern={n: a.shape[0] for n, (a, _) in parts.lora.items() if a.shape[0] != rank})
        # LoRA layers on the meta device, then the checkpoint's factors assigned (PEFT's own loading
        # path): no random init of factors about to be replaced (1.26B parameters at r=512)
        peft_model = get_peft_model(model, cfg, low_cpu_mem_usage=True)
        state = {}
        for name, (a, b) in parts.lora.items():
            module = model.get_submodule(name)
            la, lb = module.lora_A["default"].weight, module.lora_B["default"].weight
            if tuple(la.shape) != tuple(a.shape) or tuple(lb.shape) != tuple(b.shape):
                raise MismatchError(f"LoRA on {name}: A {list(a.shape)}, B {list(b.shape)} do not fit "
                                    f"the module ({list(la.shape)}, {list(lb.shape)})")
            dev = module.get_base_layer().weight.device
            # PEFT keeps adapter weights in float32 under a bf16/fp16 base (autocast_adapter_dtype)
            state[f"base_model.model.{name}.lora_A.weight"] = a.to(dev, torch.float32)
            state[f"base_model.model.{name}.lora_B.weight"] = b.to(dev, torch.float32)
        result = set_peft_model_state_dict(peft_model, state, low_cpu_mem_usage=True)
        bad = [k for k in result.unexpected_keys if "lora_" in k]
        missing = [k for k in result.missing_keys if "lora_" in k]
        if bad or missing:
            raise MismatchError(f"PEFT did not take the adapter: missing {missing[:3]}, unexpected {bad[:3]}")
        meta = [n for n, p in peft_model.named_parameters() if p.device.type == "meta"]
        if meta:
            raise MismatchError(f"LoRA weights left unset: {meta[:3]}")
        with torch.no_grad():
            for name, (a, b) in parts.lora.items():
                # loading assigned them in the base dtype; PEFT's default is float32, with the exact values
                module = model.get_submodule(name)
                module.lora_A.to(torch.float32)
                module.lora_B.to(torch.float32)
                module.lora_A["default"].weight.copy_(a)
                module.lora_B["default"].weight.copy_(b)
        peft_model.eval()
        return peft_model

    model, device_map = build_llama(config, tensors(), dtype, placement, prepare=prepare)
    info = ReferenceInfo(base=str(base_folder), base_layout=layout, adapter=str(adapter_ckpt.path),
                         alpha=alpha_used, alpha_source=source, rank=rank,
                         scale=scaling(alpha_used, rank, settings.use_rslora)
                         if (rank and alpha_used is not None) else None,
                         lora_modules=len(parts.lora), lora_pairs=parts.pairs,
                         replaced=sorted(parts.overrides), vocab_size=vocab)
    if len(ranks) > 1:
        info.notes.append(f"ranks differ between modules: {dict(ranks)} (PEFT rank_pattern)")
    return model, info, device_map


def lora_targets_info(model) -> dict[str, Any]:
    """How many PEFT LoRA layers the model holds (a sanity figure for the report)."""
    from peft.tuners.lora import LoraLayer

    return {"lora_layers": sum(1 for m in model.modules() if isinstance(m, LoraLayer))}
