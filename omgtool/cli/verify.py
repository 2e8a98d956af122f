"""`omgtool verify`: rebuild OMG-LLaVA from a merged or exported folder and run the checks.

The library is `omgtool.verify.run` (run_verify); this module parses options and renders.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer


from omgtool.cli.options import alpha_option, device_option, json_option
from omgtool.errors import CheckFailed
from omgtool.sizes import format_size


def cli(
    folder: Path = typer.Argument(..., help="merge-lora output (InternLM2 layout) or a Llama export folder"),
    adapter: Optional[Path] = typer.Option(None, "--adapter", help="the finetune (or pretrain) checkpoint "
                                           "that was merged: enables the merged vs base + unmerged LoRA check"),
    base: Optional[Path] = typer.Option(None, "--base", help="base LLM folder (default: the base recorded in "
                                        "the folder's omgtool-merge.json)"),
    alpha: Optional[float] = alpha_option(help="LoRA alpha for the reference (default: the "
                                          "mapping default, 256 for OMG-LLaVA)"),
    image: Optional[Path] = typer.Option(None, "--image", help="image for the multimodal check (default: a "
                                         "generated test image)"),
    vision_weights: Optional[Path] = typer.Option(None, "--vision-weights", help="ConvNeXt-L CLIP weights: an "
                                                  "open_clip state dict or the OMG-Seg checkpoint (default: "
                                                  "random init, flagged)"),
    projector: Optional[Path] = typer.Option(None, "--projector", help="file with projector.* weights "
                                             "(default: the folder's projector.safetensors, else --adapter)"),
    device: str = device_option(help="auto, cpu, cuda or cuda:N"),
    device_map: Optional[str] = typer.Option(None, "--device-map", help="'auto': place the LLM across GPUs, "
                                             "CPU and disk through accelerate"),
    max_memory: Optional[str] = typer.Option(None, "--max-memory", help="limits for --device-map, e.g. "
                                             "'0=20GiB,cpu=64GB'"),
    offload_folder: Optional[Path] = typer.Option(None, "--offload-folder", help="disk offload folder for "
                                                  "--device-map (default: a temporary folder)"),
    precision: str = typer.Option("auto", "--precision", help="auto (fp32 where it fits), fp32 or bf16"),
    queries: int = typer.Option(300, "--queries", help="synthesized object queries (OMG-Seg uses 300)"),
    tolerance: float = typer.Option(3.0, "--tolerance", help="merge check passes when the logit difference "
                                    "is at most this many times the noise floor measured in the run"),
    reference: str = typer.Option("default", "--reference", help="default: base + unmerged LoRA; nf4: the QLoRA "
                                  "training forward (NF4 round-trip base + unmerged LoRA): judges a merge-lora "
                                  "--base-weights nf4-dequant folder, and reports how far a standard merge is from it"),
    json_out: bool = json_option("print one JSON report to stdout (errors as {\"error\", \"exit_code\"})"),
) -> None:
    """Rebuild the full OMG-LLaVA model and check it computes: LLM forward, merged vs base + unmerged
    LoRA (with --adapter), image -> trunk -> pixel shuffle -> projector -> LLM, and [SEG] -> text2vision.
    """
    from contextlib import nullcontext

    from omgtool.cli.output import ProgressRenderer, emit_json, state
    from omgtool.progress import NULL_PROGRESS
    from omgtool.verify.placement import parse_max_memory
    from omgtool.verify.run import VerifyOptions, run_verify

    progress = NULL_PROGRESS if json_out or state.quiet else ProgressRenderer()
    opts = VerifyOptions(folder=folder, adapter=adapter, base=base, alpha=alpha, image=image,
                         vision_weights=vision_weights, projector=projector, device=device,
                         device_map=device_map, max_memory=parse_max_memory(max_memory),
                         offload_folder=offload_folder, precision=precision.lower(), num_queries=queries,
                         tolerance_factor=tolerance, reference=reference.lower(),
                         progress=progress)
    with progress if isinstance(progress, ProgressRenderer) else nullcontext():
        report = run_verify(opts)
    if json_out:
        emit_json(report)
    else:
        render(report)
    if report["failed"]:
        reasons = "; ".join(f"{name}: {report['checks'][name].get('reason', 'failed')}" for name in report["failed"])
        raise CheckFailed(f"verify failed ({reasons})")


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def render(report: dict[str, Any]) -> None:
    from rich.markup import escape as esc

    from omgtool.cli.output import out, print_table

    console = out()
    prec = report["precision"]
    console.print(f"[bold]{esc(report['folder'])}[/] · {report['layout']} · {esc(report['device'])} · "
                  f"{esc(report['placement'])} · compute {prec['compute']} ({esc(prec['why'])}) · stored "
                  f"{prec['stored']}")
    colors = {"pass": "green", "fail": "red", "skipped": "yellow", "info": "cyan"}
    checks = report["checks"]
    print_table(console, "checks", ("check", "status", "numbers"),
                [(name, c["status"], _summary(name, c)) for name, c in checks.items()],
                cell_styles=[(None, colors.get(c["status"]), None) for c in checks.values()])
    t = report["timings_s"]
    console.print("timings " + ", ".join(f"{k} {v:.2f}s" for k, v in t.items()))
    m = report["memory"]
    gpu = (f" · peak GPU {format_size(m.get('peak_gpu_allocated_bytes'))}"
           + (f" ({m['peak_gpu_over_bf16_weights']}x the bf16 weights)" if m.get("peak_gpu_over_bf16_weights")
              else "")) if m.get("peak_gpu_allocated_bytes") is not None else ""
    console.print(f"memory peak CPU RSS {format_size(m['peak_cpu_rss_bytes'])}{gpu}")
    for s in report["synthesized"]:
        console.print(f"[yellow]synthesized:[/] {esc(s)}")
    for n in report["notes"]:
        console.print(f"[yellow]note:[/] {esc(n)}")
    verdict = "[green]all checks passed[/]" if report["passed"] else f"[red]failed: {', '.join(report['failed'])}[/]"
    console.print(verdict)


def _summary(name: str, c: dict[str, Any]) -> str:
    if c["status"] == "skipped":
        return c.get("reason", "")
    parts: list[str] = []
    if name == "llm_forward" and "logits" in c:
        lg = c["logits"]
        parts.append(f"{c['tokens']} tokens, logits {lg['shape']} finite={lg['finite']} std {lg['std']:.3g}")
    elif name == "merge" and "delta" in c:
        d, f = c["delta"], c.get("floor", {})
        parts.append(f"Δ max {d['max_abs']:.4g} mean {d['mean_abs']:.4g} relL2 {d['rel_l2']:.4g} "
                     f"top1 {d['top1_agreement']:.1%}")
        if f:
            parts.append(f"floor relL2 {f['rel_l2']:.4g} → tol {c['tolerance_rel_l2']:.4g}")
        if "lora_effect" in c:
            parts.append(f"LoRA effect relL2 {c['lora_effect']['rel_l2']:.4g}")
        parts.append(f"alpha {c['reference']['alpha']:g} (scale {_fmt(c['reference']['scale'])})")
        if c.get("reference_base", "original") != "original":
            parts.append(f"reference: {c['reference_base']}")
    elif name == "multimodal" and "visual_tokens" in c:
        v = c["visual_tokens"]
        parts.append(f"trunk {c.get('trunk_last_stage')} → shuffle {c.get('pixel_shuffled')} → "
                     f"{v['grid']} grid + 1 sep + {v['queries']} queries = {v['total']} tokens; "
                     f"sequence {c.get('sequence', {}).get('total')}")
    elif name == "training_forward" and "line" in c:
        parts.append(c["line"])
    elif name == "seg" and "vector_shape" in c:
        parts.append(f"[SEG] id {c['seg_id']} at {c['positions']} → vector {c['vector_shape']}")
    if c.get("reason"):
        parts.append(c["reason"])
    if c.get("warning"):
        parts.append("warning: " + c["warning"])
    return "; ".join(parts)
