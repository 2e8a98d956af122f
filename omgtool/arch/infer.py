"""Architecture from shapes: which family a checkpoint belongs to, its stage, its dimensions.

Everything here is driven by `mappings/`: the weight templates say what each shape
dimension means; the named derivations below turn those dimensions into the numbers a
user asks for (heads, kv heads, CLIP channels), each assumption stated with its source.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable

from omgtool.errors import InvalidArgument
from omgtool.formats.base import Checkpoint
from omgtool.arch.mapping import (ArchitectureMapping, FamilyMapping, KeyMatch, Registry, load_registry, match_keys,
                                  split_peft)
from omgtool.formats.config_values import usable_adapter_config


@dataclass(frozen=True)
class LoraPair:
    component: str
    weight: str  # base weight name inside the component, e.g. model.layers.0.attention.wqkv.weight
    a_key: str
    b_key: str
    layer: int | None
    module: str  # short target name: wqkv, w1, output, q_proj


@dataclass
class Analysis:
    family: FamilyMapping | None
    matches: dict[str, KeyMatch]
    unexplained: list[str]
    groups: dict[str, list[str]]
    stage: str | None
    architecture: dict[str, Any]
    lora_pairs: list[LoraPair]
    notes: list[str] = field(default_factory=list)
    stage_reason: str = ""  # why this stage: LoRA factors, PEFT's wrapper prefix, or neither

    @property
    def family_name(self) -> str:
        return self.family.name if self.family else "unknown"


def detect_family(keys: list[str], ckpt: Checkpoint | None, registry: Registry,
                  name: str | None = None) -> tuple[FamilyMapping | None, dict[str, KeyMatch], list[str]]:
    """The family explaining most keys (required components present); ties by priority."""
    if name is not None:
        fam = registry.family(name)
        return (fam, *match_keys(keys, fam, registry))
    best = None
    for fam in registry.families.values():
        if fam.lora and fam.lora.needs_adapter_config and not _has_adapter_config(ckpt):
            continue
        matches, unexplained = match_keys(keys, fam, registry)
        present = {m.component for m in matches.values()}
        if not matches or any(c.required and c.name not in present for c in fam.components):
            continue
        score = (len(matches), fam.priority)
        if best is None or score > best[0]:
            best = (score, fam, matches, unexplained)
    if best is None:
        return None, {}, list(keys)
    return best[1], best[2], best[3]


def _has_adapter_config(ckpt: Checkpoint | None) -> bool:
    return adapter_config(ckpt) is not None


def adapter_config(ckpt: Checkpoint | None) -> dict | None:
    """The adapter_config.json read beside the weights, if its values have usable types."""
    return usable_adapter_config(ckpt.metadata.get("adapter_config")) if ckpt is not None else None


def adapter_settings(ckpt: Checkpoint | None):
    """The LoRA-meaning entries (omgtool.kernels.lora.AdapterSettings) of a checkpoint's
    adapter_config.json, when its values have usable types; else the defaults."""
    from omgtool.kernels.lora import AdapterSettings

    return AdapterSettings.from_config(adapter_config(ckpt))


def find_lora_pairs(matches: dict[str, KeyMatch]) -> tuple[list[LoraPair], list[str]]:
    """Pairs of (A, B) per target weight, in key order; notes for halves without a partner."""
    halves: dict[tuple[str, str], dict[str, KeyMatch]] = defaultdict(dict)
    for m in matches.values():
        if m.role in ("lora_A", "lora_B"):
            halves[(m.component, m.weight)][m.role] = m
    pairs, notes = [], []
    for (component, weight), h in halves.items():
        if "lora_A" in h and "lora_B" in h:
            a = h["lora_A"]
            pairs.append(LoraPair(component, weight, a.key, h["lora_B"].key, a.layer, a.module))
        else:
            have = next(iter(h.values()))
            notes.append(f"LoRA factor without its partner: {have.key}")
    return pairs, notes


def resolve_alpha(family: FamilyMapping | None, ckpt: Checkpoint | None,
                  override: float | None = None) -> tuple[float | None, str]:
    """LoRA alpha and where it came from: the user, the checkpoint, or the mapping default."""
    if override is not None:
        return float(override), "user (--alpha)"
    if family is None or family.lora is None:
        return None, "unknown: no family mapping gives a LoRA alpha; pass --alpha"
    if family.lora.alpha_from == "adapter_config":
        cfg = adapter_config(ckpt)
        if isinstance(cfg, dict) and cfg.get("lora_alpha") is not None:
            return float(cfg["lora_alpha"]), "checkpoint (adapter_config.json lora_alpha)"
        if not isinstance(cfg, dict):
            return None, "unknown: no adapter_config.json was read (open the run folder); pass --alpha"
        return None, "unknown: adapter_config.json has no lora_alpha; pass --alpha"
    return family.lora.default_alpha, family.lora.alpha_source


def analyze(ckpt: Checkpoint, registry: Registry | None = None, family: str | None = None,
            alpha: float | None = None) -> Analysis:
    registry = registry or load_registry()
    # Tensors outside the model's state dict (optimizer state, EMA copies) keep their own groups
    # and take no part in family inference.
    keys = [k for k in ckpt.tensors if k not in ckpt.groups]
    fam, matches, unexplained = detect_family(keys, ckpt, registry, family)
    groups: dict[str, list[str]] = defaultdict(list)
    for key in ckpt.tensors:
        groups[matches[key].group if key in matches else ckpt.groups.get(key, "unexplained")].append(key)
    pairs, notes = find_lora_pairs(matches)
    if any(m.role == "dora_magnitude" for m in matches.values()):
        notes.append("DoRA magnitude vectors present: this is DoRA, not plain LoRA (merge refused)")

    stage, stage_reason = None, ""
    if fam is not None:
        present = {m.component for m in matches.values()}
        lora_run, why = lora_run_evidence(fam, matches, pairs)
        for spec in fam.stages:
            if not (spec.when == "always" or (spec.when == "lora") == lora_run):
                continue
            if set(spec.present) - present or set(spec.absent) & present:
                continue
            stage, stage_reason = spec.name, why
            if lora_run and not pairs:
                notes.append(f"stage {stage}: {why}")
            break

    architecture: dict[str, Any] = {"family": fam.name if fam else "unknown", "stage": stage}
    if fam is not None:
        architecture["description"] = fam.description
        by_component: dict[str, list[KeyMatch]] = defaultdict(list)
        for m in matches.values():
            by_component[m.component].append(m)
        for comp in fam.components:
            arch = registry.architecture(comp.architecture)
            comp_matches = by_component.get(comp.name, [])
            if not comp_matches:
                architecture[comp.name] = None
                continue
            dims, dim_notes = collect_dims(ckpt, comp_matches)
            notes.extend(dim_notes)
            info: dict[str, Any] = {"architecture": arch.name}
            for derivation in arch.derive:
                if derivation not in DERIVATIONS:
                    raise InvalidArgument(f"mapping {arch.name} names unknown derivation {derivation!r}")
                info.update(DERIVATIONS[derivation](dims, arch, comp_matches, notes))
            architecture[comp.name] = info
        architecture["lora"] = lora_summary(ckpt, fam, pairs, alpha, notes) if pairs else None
    return Analysis(fam, matches, unexplained, dict(groups), stage, architecture, pairs, notes, stage_reason)


PEFT_WRAPPER = "base_model.model."


def lora_run_evidence(family: FamilyMapping, matches: dict[str, KeyMatch], pairs: list[LoraPair]) -> tuple[bool, str]:
    """(whether the file comes from a LoRA run, why). LoRA factors say so; so does PEFT's wrapper
    prefix (`base_model.model.`, also under a component prefix: `llm.base_model.model.`) on the
    keys without factors: a file saved from the PEFT-wrapped model, such as LLaVA's
    non_lora_trainables.bin, is stage-2 output even though it holds no LoRA."""
    if pairs:
        return True, f"{len(pairs)} LoRA pairs"
    prefixes = {c.name: sorted(c.prefixes, key=len, reverse=True) for c in family.components}
    for key, m in matches.items():
        prefix = next((p for p in prefixes.get(m.component, ())
                       if key.startswith(p) and split_peft(key[len(p):])[0] == m.weight), None)
        if prefix is not None and (prefix == PEFT_WRAPPER or prefix.endswith("." + PEFT_WRAPPER)):
            return True, (f"no LoRA factors in this file, but its keys carry PEFT's wrapper prefix "
                          f"`{prefix}` (e.g. {key}): saved from a PEFT-wrapped (LoRA) run")
    return False, "no LoRA factors and no PEFT wrapper prefix on the keys"


def lora_summary(ckpt: Checkpoint, fam: FamilyMapping, pairs: list[LoraPair], alpha_override,
                 notes: list[str]) -> dict[str, Any]:
    shaped = [p for p in pairs if len(ckpt.tensors[p.a_key].shape) == 2 and ckpt.tensors[p.a_key].shape[0] > 0]
    if len(shaped) < len(pairs):
        notes.append(f"{len(pairs) - len(shaped)} LoRA A factors are not [rank > 0, in] matrices")
    if not shaped:
        return {"rank": None, "alpha": None, "alpha_source": "unknown: no usable LoRA factors",
                "scale": None, "targets": [], "num_pairs": len(pairs), "components": []}
    ranks = Counter(ckpt.tensors[p.a_key].shape[0] for p in shaped)
    rank = ranks.most_common(1)[0][0]
    if len(ranks) > 1:
        notes.append(f"LoRA ranks differ between modules: {dict(ranks)} (rank_pattern)")
    alpha, source = resolve_alpha(fam, ckpt, alpha_override)
    out = {
        "rank": rank,
        "alpha": alpha,
        "alpha_source": source,
        "scale": lora_scaling(alpha, rank, ckpt) if alpha is not None else None,
        "targets": sorted({p.module for p in pairs}),
        "num_pairs": len(pairs),
        "components": sorted({p.component for p in pairs}),
    }
    cfg = adapter_config(ckpt)
    if isinstance(cfg, dict):
        out["adapter_config"] = {k: cfg.get(k) for k in ADAPTER_CONFIG_FIELDS if k in cfg}
        if cfg.get("r") is not None and cfg["r"] != rank:
            notes.append(f"adapter_config.json says r={cfg['r']} but the LoRA factors have rank {rank}")
        for key in ("alpha_pattern", "rank_pattern"):
            if cfg.get(key):
                shown = ", ".join(f"{k}: {v}" for k, v in list(cfg[key].items())[:10])
                more = f" and {len(cfg[key]) - 10} more" if len(cfg[key]) > 10 else ""
                notes.append(f"adapter_config.json has a per-module {key}: {{{shown}}}{more}")
        if cfg.get("use_dora"):
            notes.append("adapter_config.json sets use_dora: this is DoRA, not plain LoRA (merge refused)")
    return out


#: adapter_config.json entries shown by inspect (what the adapter targets and saves).
ADAPTER_CONFIG_FIELDS = ("peft_type", "r", "lora_alpha", "use_rslora", "target_modules", "modules_to_save",
                         "base_model_name_or_path", "task_type", "rank_pattern", "alpha_pattern", "use_dora",
                         "fan_in_fan_out", "bias")


def lora_scaling(alpha: float, rank: int, ckpt: Checkpoint | None = None) -> float:
    """The checkpoint's LoRA scaling for `rank` (omgtool.kernels.lora says what it means)."""
    from omgtool.kernels.lora import scaling

    return scaling(alpha, rank, adapter_settings(ckpt).use_rslora)


def collect_dims(ckpt: Checkpoint, comp_matches: list[KeyMatch]) -> tuple[dict[str, int], list[str]]:
    """Dimension name -> value, read from shapes per the mapping's `dims`; conflicts noted."""
    seen: dict[str, dict[int, str]] = defaultdict(dict)
    notes: list[str] = []
    for m in comp_matches:
        shape = ckpt.tensors[m.key].shape
        dims = m.spec.dims
        if not dims or m.role == "dora_magnitude":
            continue
        if m.role == "weight":
            if len(shape) != len(dims):
                notes.append(f"{m.key}: shape {list(shape)} does not fit dims {dims}")
                continue
            observed = zip(dims, shape)
        elif len(dims) != 2 or len(shape) != 2:
            continue
        elif m.role == "lora_A":
            observed = [(dims[1], shape[1])]
        else:
            observed = [(dims[0], shape[0])]
        for name, value in observed:
            if name != "_":
                seen[name].setdefault(int(value), m.key)
    dims_out: dict[str, int] = {}
    for name, values in seen.items():
        if len(values) > 1:
            shown = ", ".join(f"{v} ({k})" for v, k in values.items())
            notes.append(f"conflicting {name}: {shown}")
        dims_out[name] = next(iter(values))
    return dims_out, notes


# --- named derivations (referenced from mappings by name) ---------------------------------

def _num_layers(dims, arch: ArchitectureMapping, matches: list[KeyMatch], notes) -> dict:
    layers = sorted({m.layer for m in matches if m.layer is not None})
    if not layers:
        return {"num_layers": None}
    missing_count = layers[-1] + 1 - len(layers)
    if missing_count:
        missing, expected = [], 0  # the first few gaps, without building range(top layer)
        for layer in layers:
            missing.extend(range(expected, min(layer, expected + 20 - len(missing))))
            expected = layer + 1
            if len(missing) >= 20:
                break
        more = f" and {missing_count - len(missing)} more" if missing_count > len(missing) else ""
        notes.append(f"layers missing from the checkpoint: {missing}{more}")
    return {"num_layers": layers[-1] + 1}


def _gqa_heads(dims, arch: ArchitectureMapping, matches, notes) -> dict:
    head_dim = int(arch.defaults.get("head_dim", 0)) or None
    hidden = dims.get("hidden_size")
    out: dict[str, Any] = {
        "vocab_size": dims.get("vocab_size"),
        "hidden_size": hidden,
        "intermediate_size": dims.get("intermediate_size"),
        "num_attention_heads": None,
        "num_key_value_heads": None,
        "head_dim": head_dim,
        "head_dim_source": arch.defaults.get("head_dim_source", ""),
    }
    if hidden and head_dim and hidden % head_dim == 0:
        heads = hidden // head_dim
        out["num_attention_heads"] = heads
        if "qkv_size" in dims:  # fused [q x heads, k x kv, v x kv]
            kv2 = dims["qkv_size"] // head_dim - heads
            if dims["qkv_size"] % head_dim == 0 and kv2 > 0 and kv2 % 2 == 0:
                out["num_key_value_heads"] = kv2 // 2
            else:
                notes.append(f"qkv size {dims['qkv_size']} does not fit head_dim {head_dim}")
        elif "kv_size" in dims and dims["kv_size"] % head_dim == 0:
            out["num_key_value_heads"] = dims["kv_size"] // head_dim
    elif hidden and head_dim:
        notes.append(f"hidden size {hidden} is not a multiple of the assumed head_dim {head_dim}")
    return out


def _omg_projector(dims, arch: ArchitectureMapping, matches, notes) -> dict:
    ratio = int(arch.defaults["pixel_shuffle_ratio"])
    shuffled, query_in, feat_in = (dims.get(k) for k in
                                   ("shuffled_channels", "query_in_channels", "feat_in_channels"))
    out: dict[str, Any] = {
        "hidden_size": dims.get("hidden_size"),
        "shuffled_channels": shuffled,
        "query_in_channels": query_in,
        "feat_in_channels": feat_in,
        "pixel_shuffle_ratio": ratio,
        "pixel_shuffle_ratio_source": arch.defaults["pixel_shuffle_ratio_source"],
        "clip_channels": shuffled // (ratio * ratio) if shuffled and shuffled % (ratio * ratio) == 0 else None,
        "query_channels": query_in // 2 if query_in and query_in % 2 == 0 else None,
    }
    grid = int(arch.defaults["image_size"]) // int(arch.defaults["clip_stride"]) // ratio
    out["grid_tokens"] = grid * grid
    out["image_size"] = int(arch.defaults["image_size"])
    if shuffled and query_in and feat_in and feat_in != shuffled + query_in:
        notes.append(f"projector: model_feat input {feat_in} != shuffled CLIP {shuffled} + query {query_in}")
    return out


def _text2vision(dims, arch, matches, notes) -> dict:
    return {"in_features": dims.get("hidden_size"), "out_features": dims.get("query_dim")}


def _dims(dims, arch, matches, notes) -> dict:
    """Every named dimension the mapping's `dims` read from the shapes, as is."""
    return {k: v for k, v in sorted(dims.items())}


def _mlp_projector(dims, arch: ArchitectureMapping, matches: list[KeyMatch], notes) -> dict:
    """Widths of a chain of linears (in the mapping's weight order): e.g. 1024 -> 4096 -> 4096."""
    seen = {m.template for m in matches}  # weights, or LoRA factors on them (adapters)
    widths: list[int | None] = []
    for spec in arch.weights:
        if spec.name not in seen or len(spec.dims) != 2:
            continue
        out_dim, in_dim = (dims.get(d) for d in spec.dims)
        if not widths:
            widths.append(in_dim)
        elif widths[-1] != in_dim:
            notes.append(f"{arch.name}: {spec.name} takes {in_dim} features but the previous layer gives "
                         f"{widths[-1]}")
        widths.append(out_dim)
    out: dict[str, Any] = {"mm_hidden_size": dims.get("mm_hidden_size"), "hidden_size": dims.get("hidden_size"),
                           "widths": widths}
    for key, value in arch.defaults.items():
        if key.startswith("projector_type"):
            out[key] = value
    return out


DERIVATIONS: dict[str, Callable[..., dict]] = {
    "num_layers": _num_layers,
    "gqa_heads": _gqa_heads,
    "omg_projector": _omg_projector,
    "text2vision": _text2vision,
    "dims": _dims,
    "mlp_projector": _mlp_projector,
}


def register_derivation(name: str, func: Callable[..., dict]) -> None:
    if name in DERIVATIONS:
        raise InvalidArgument(f"derivation {name!r} is already registered")
    DERIVATIONS[name] = func
