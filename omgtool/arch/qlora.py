"""QLoRA settings: how training held the base (the family mapping's [qlora]) plus --bnb-* overrides.

    plan = plan_qlora(family, stage, "nf4-dequant", {"blocksize": 128}, names)
    plan.settings      # omgtool.kernels.nf4_settings.QuantSettings
    plan.sources       # each setting -> where its value comes from
    plan.quantized     # the tensor names training held in 4-bit

Modes of merge-lora --base-weights: "original" (LoRA into the original weights, the standard
merge) and "nf4-dequant" (LoRA into each quantized weight's bitsandbytes round trip: the
weights the training forward multiplied by).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omgtool.errors import InvalidArgument

MODES = ("original", "nf4-dequant")
SETTINGS = ("quant_type", "blocksize", "double_quant", "load_dtype", "compute_dtype")
OPTION = {"quant_type": "--bnb-quant-type", "blocksize": "--bnb-blocksize", "double_quant": "--bnb-double-quant",
          "load_dtype": "--bnb-load-dtype", "compute_dtype": "--bnb-compute-dtype"}
IMPLEMENTATION = ("omgtool.kernels.nf4: plain-torch reimplementation of bitsandbytes' CUDA kernels "
                  "(kQuantizeBlockwise / kDequantizeBlockwise, dQuantizeNF4 / dQuantizeFP4 trees, dQuantize on "
                  "the 8-bit dynamic map); bitsandbytes is not used")


@dataclass
class QloraPlan:
    mode: str
    settings: Any  # omgtool.kernels.nf4_settings.QuantSettings
    sources: dict[str, str]
    quantized: list[str]
    skipped: list[str]
    skipped_source: str
    quantized_source: str
    source: str
    notes: list[str] = field(default_factory=list)

    @property
    def rounds_base(self) -> bool:
        return self.mode == "nf4-dequant"

    def settings_dict(self) -> dict[str, dict[str, Any]]:
        return {k: {"value": getattr(self.settings, k), "source": self.sources[k]} for k in SETTINGS}

    def as_dict(self) -> dict[str, Any]:
        return {"base_weights": self.mode, "settings": self.settings_dict(),
                "double_quant_detail": {"offset": "fp32 mean of the 4-bit absmax", "map": "8-bit signed dynamic",
                                        "blocksize": 256} if self.settings.double_quant else None,
                "implementation": IMPLEMENTATION, "quantized": self.quantized, "quantized_source": self.quantized_source,
                "skipped": self.skipped, "skipped_source": self.skipped_source, "source": self.source,
                "notes": self.notes}

    def describe_lines(self, out_dtype: str | None) -> list[str]:
        """The plan's lines; `out_dtype`: the merged model's dtype (canonical, e.g. BF16)."""
        from omgtool.formats.dtypes import HF_CONFIG_NAMES

        lines = [f"base weights: {self.mode}" + (
            " (LoRA added to the bitsandbytes 4-bit round trip of each weight training held in 4-bit)"
            if self.rounds_base else " (LoRA added to the original weights; the 4-bit round trip is measured only)")]
        for k in SETTINGS:
            lines.append(f"  qlora {k} = {getattr(self.settings, k)} ({self.sources[k]})")
        lines.append(f"  quantized {len(self.quantized)} weights; kept in full precision: "
                     f"{', '.join(self.skipped) or 'none'} ({self.skipped_source})")
        want = {"fp16": "F16", "bf16": "BF16", "fp32": "F32"}[self.settings.compute_dtype]
        if self.rounds_base and out_dtype != want:
            lines.append(f"  suggestion: --dtype {self.settings.compute_dtype} (training's compute dtype; the merged "
                         f"weights are now rounded to {HF_CONFIG_NAMES.get(out_dtype, out_dtype)})")
        return lines


def plan_qlora(fam, stage: str | None, mode: str, overrides: dict[str, Any] | None, names: list[str],
               base_prefix: str = "", trained: set[str] | frozenset = frozenset()) -> QloraPlan | None:
    """The QLoRA plan for a merge of `names` (the model's tensor names; `trained`: those the
    checkpoint replaces with fully trained tensors, never quantized); None when the family
    records no QLoRA training, or it does not cover this stage, and mode is "original"."""
    from omgtool.arch.mapping import Template
    from omgtool.kernels.nf4_settings import QuantSettings

    if mode not in MODES:
        raise InvalidArgument(f"--base-weights must be one of {', '.join(MODES)}, not {mode!r}")
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    unknown = sorted(set(overrides) - set(SETTINGS))
    if unknown:
        raise InvalidArgument(f"unknown QLoRA setting {unknown[0]!r}")
    spec = fam.qlora
    if spec is None or (stage is not None and stage not in spec.stages):
        if mode == "original":
            return None
        why = (f"family {fam.name} records no QLoRA training (no [qlora] in its mapping)" if spec is None else
               f"family {fam.name} trained stage(s) {', '.join(spec.stages)} on a 4-bit base, not stage {stage}")
        raise InvalidArgument(f"--base-weights nf4-dequant: {why}")
    values = {k: getattr(spec, k) for k in SETTINGS}
    sources = {k: f"mapping (mappings/family_{fam.name.replace('-', '_')}.toml): {getattr(spec, k + '_source')}"
               for k in SETTINGS}
    for k, v in overrides.items():
        values[k] = v
        sources[k] = f"user ({OPTION[k]})"
    try:
        settings = QuantSettings(**values)
    except ValueError as exc:
        raise InvalidArgument(f"QLoRA settings: {exc}") from None
    patterns = [Template(base_prefix + t) for t in spec.quantized]
    skipped_rx = [Template(base_prefix + t) for t in spec.skipped]
    quantized = [n for n in names if n not in trained and any(rx.match(n) for rx in patterns)]
    skipped = [n for n in names if any(rx.match(n) for rx in skipped_rx)]
    plan = QloraPlan(mode, settings, sources, quantized, skipped, spec.skipped_source, spec.quantized_source,
                     spec.source)
    if not quantized:
        plan.notes.append("no tensor of the base matches the mapping's quantized templates")
    return plan
