"""verify --reference nf4: the training-time forward of a QLoRA run as the reference.

The reference model is the base with every weight training held in 4-bit replaced by its
bitsandbytes round trip (omgtool.kernels.nf4, in the compute dtype), plus the adapter's LoRA
unmerged through PEFT's layers: what the QLoRA training (and its official evaluation)
computed. The settings and the quantized tensors come from the merge's omgtool-merge.json
(`qlora`), else from the family mapping.

- a merge made with --base-weights nf4-dequant is judged against it (check `merge`): it
  must match within the output dtype's rounding, the floor the merge check measures;
- a standard merge (--base-weights original) keeps its own check against the original base;
  `training_forward` then says, as information, how far it is from the training forward and
  how large the LoRA's own effect is.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

REFERENCES = ("default", "nf4")


@dataclass
class Nf4Reference:
    merge_mode: str  # how the folder was merged: original | nf4-dequant
    merge_mode_source: str
    settings: Any  # omgtool.kernels.nf4.QuantSettings
    settings_source: str
    quantized: list[str]
    notes: list[str] = field(default_factory=list)

    def base_view(self) -> Callable:
        from omgtool.ops.qlora import RoundTrippedCheckpoint

        return lambda ckpt: RoundTrippedCheckpoint(ckpt, self.quantized, self.settings)

    def as_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return {"reference": "NF4-dequantized base (bitsandbytes round trip, omgtool.kernels.nf4) in the compute "
                             "dtype + unmerged LoRA through PEFT's layers: the training-time forward",
                "merge_base_weights": self.merge_mode, "merge_base_weights_source": self.merge_mode_source,
                "settings": asdict(self.settings), "settings_source": self.settings_source,
                "quantized": len(self.quantized), "notes": self.notes}


def _record(folder: Path) -> tuple[dict, str | None]:
    from omgtool.formats.jsonfile import read_json_object

    path = folder / "omgtool-merge.json"
    if path.is_file():
        return read_json_object(path, missing_ok=True), str(path)
    export = read_json_object(folder / "omgtool-export.json", missing_ok=True)
    src = export.get("source") if isinstance(export, dict) else None
    if isinstance(src, str) and (Path(src) / "omgtool-merge.json").is_file():
        return read_json_object(Path(src) / "omgtool-merge.json", missing_ok=True), str(Path(src) / "omgtool-merge.json")
    return {}, None


def nf4_reference(folder: Path, base_path: Path, analysis) -> Nf4Reference:
    """The round trip's settings and tensors for verifying `folder` (merged from `analysis`' checkpoint)."""
    from omgtool.arch.qlora import plan_qlora
    from omgtool.errors import InvalidArgument
    from omgtool.formats import open_checkpoint
    from omgtool.kernels.nf4 import QuantSettings

    record, where = _record(Path(folder))
    q = record.get("qlora") if isinstance(record.get("qlora"), dict) else None
    if q is not None and isinstance(q.get("settings"), dict):
        try:
            settings = QuantSettings(**{k: v["value"] for k, v in q["settings"].items()})
        except (TypeError, KeyError, ValueError) as exc:
            raise InvalidArgument(f"{where}: unreadable qlora settings ({exc})") from None
        quantized = [n for n in q.get("quantized", []) if isinstance(n, str)]
        return Nf4Reference(str(q.get("base_weights", "original")), f"{where} (qlora.base_weights)", settings,
                            f"{where} (qlora.settings)", quantized)
    fam = analysis.family
    if fam is None:
        raise InvalidArgument("--reference nf4: the adapter's family is unknown, and the folder records no QLoRA "
                              "settings")
    base = open_checkpoint(base_path)
    comp = fam.qlora.component if fam.qlora else "llm"
    prefix = next((c.base_prefix for c in fam.components if c.name == comp), "")
    plan = plan_qlora(fam, analysis.stage, "nf4-dequant", None, list(base.tensors), prefix)
    base.close()
    ref = Nf4Reference("original", "assumed: the folder's merge record has no qlora section", plan.settings,
                       f"family mapping {fam.name} [qlora]", plan.quantized)
    ref.notes.append("the merge record does not say which base weights the merge used; taken as original")
    return ref


def training_forward_info(merged_logits, ref_logits, base_only_logits, compare) -> dict[str, Any]:
    """The informational check for a standard merge: its distance from the training forward."""
    delta = compare(merged_logits, ref_logits)
    effect = compare(base_only_logits, ref_logits)
    line = (f"deviates from the training forward by rel L2 {delta['rel_l2']:.4g} (top-1 agreement "
            f"{delta['top1_agreement']:.1%}); the LoRA's effect is rel L2 {effect['rel_l2']:.4g}")
    return {"status": "info", "delta": delta, "lora_effect": effect, "line": line}
