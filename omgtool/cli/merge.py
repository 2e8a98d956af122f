"""`omgtool merge-lora CHECKPOINT --base BASE --out DIR`.

The library is `omgtool.ops.merge` (plan_merge -> Plan, Plan.describe, run_merge); this module is
the command line: options, a progress bar on stderr, the summary.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from omgtool.cli.options import alpha_option, device_option, dtype_option, family_option, \
    force_option, json_option, max_shard_option, out_option
from omgtool.cli.scan import allow_global_option, trusting_globals
from omgtool.errors import InvalidArgument


@trusting_globals
def cli(
    checkpoint: Path = typer.Argument(..., help="finetune or pretrain checkpoint (.pth, .safetensors, "
                                      "DeepSpeed or PEFT adapter folder)"),
    base: Optional[str] = typer.Option(None, "--base", help="base model: a folder, or a name such as "
                                       "internlm2-chat-7b or internlm/internlm2-chat-7b (looked up in the "
                                       "current directory, beside the checkpoint, then the local HuggingFace "
                                       "cache; never downloaded)"),
    out: Optional[Path] = out_option(None, help="output folder (refused if it exists, unless --force)"),
    alpha: Optional[float] = alpha_option(help="LoRA alpha (default: the family mapping's, "
                                          "256 for OMG-LLaVA, or adapter_config.json's)"),
    dtype: Optional[str] = dtype_option(help="output dtype bf16, fp16 or fp32 (default: the "
                                        "base's dtype; untouched tensors are then copied bit-exactly)"),
    family: Optional[str] = family_option(help="force a family mapping (e.g. omg-llava)"),
    max_shard_size: str = max_shard_option(help="largest model shard (HF sizes: 5GB, "
                                       "200MB, 200KB, 2GiB)"),
    device: str = device_option(help="where the LoRA matmuls run: auto (cuda when "
                               "available), cpu, cuda or cuda:N"),
    dry_run: bool = typer.Option(False, "--dry-run", help="print the plan (merged, replaced, copied) "
                                 "and write nothing"),
    hash_base: bool = typer.Option(True, "--hash-base/--no-hash-base", help="record the base shards' sha256 "
                                   "(hashed on a background thread while merging); --no-hash-base records "
                                   "their sizes only"),
    force: bool = force_option(),
    base_weights: str = typer.Option("original", "--base-weights", help="original: LoRA into the original "
                                     "weights (the standard merge); nf4-dequant: into each weight's bitsandbytes "
                                     "4-bit round trip, the weights a QLoRA training multiplied by (settings from "
                                     "the family mapping; see --bnb-*)"),
    bnb_quant_type: Optional[str] = typer.Option(None, "--bnb-quant-type", help="QLoRA 4-bit type nf4|fp4 "
                                                 "(default: the family mapping's)"),
    bnb_blocksize: Optional[int] = typer.Option(None, "--bnb-blocksize", help="QLoRA quantization blocksize "
                                                "(default: the family mapping's, 64)"),
    bnb_double_quant: Optional[bool] = typer.Option(None, "--bnb-double-quant/--no-bnb-double-quant",
                                                    help="QLoRA double quantization of the absmax (default: the "
                                                    "family mapping's)"),
    bnb_load_dtype: Optional[str] = typer.Option(None, "--bnb-load-dtype", help="dtype the base was loaded in "
                                                 "before quantizing: fp16|bf16|fp32 (default: the mapping's)"),
    bnb_compute_dtype: Optional[str] = typer.Option(None, "--bnb-compute-dtype", help="QLoRA compute dtype "
                                                    "fp16|bf16|fp32 (default: the mapping's)"),
    quant_stats: bool = typer.Option(True, "--quant-stats/--no-quant-stats", help="measure the 4-bit round "
                                     "trip's error per weight (||q||/||W||, ||q||/||delta||) where the family "
                                     "records QLoRA training, also with --base-weights original"),
    json_out: bool = json_option("print one JSON object (the plan with --dry-run, else the merge report; "
                                 "errors as {\"error\", \"exit_code\"})"),
    allow_global: list[str] = allow_global_option(),
) -> None:
    """Merge a checkpoint's LoRA into its base model and write a complete model folder.

    For every LoRA pair W' = W + (alpha/r) B@A, in float32, rounded once to the output dtype.
    The checkpoint's trained full tensors (OMG-LLaVA: tok_embeddings and output, resized to
    the added tokens) replace the base's; output also gets its own LoRA. Untouched base
    tensors are copied bit-exactly. Works for a pretrain checkpoint (no LoRA) and a LoRA on
    only some modules.

    The output has the base's key names and layout (sharded safetensors + index),
    config.json with vocab_size = the embedding rows, every non-weight file of the base,
    the family's added special tokens registered at the ids training used (README.md explains
    them), non-LLM tensors in projector.safetensors, unexplained ones in extras.safetensors,
    and omgtool-merge.json (inputs and sha256, alpha and its source, rank, scale, per-target
    delta norms, output checksums).

    Everything is planned and checked before writing: a mismatch of base and checkpoint
    (hidden size, layer count, LoRA rank, a target the base lacks) stops with exit 2 naming
    the tensor. Tensors stream one at a time into a temporary sibling folder that is renamed
    at the end; a failure or Ctrl-C leaves nothing behind.
    """
    import contextlib

    from omgtool.cli.output import ProgressRenderer, emit_json, print_plan
    from omgtool.formats.output_dir import check_not_overlapping, reserve_output
    from omgtool.ops.merge import plan_merge, run_merge

    if out is None and not dry_run:
        raise InvalidArgument("--out is required (or use --dry-run)")
    writing = out is not None and not dry_run
    with contextlib.ExitStack() as stack:
        if writing:  # before any planning: refused --out, a second writer, leftovers of a killed run
            stack.enter_context(reserve_output(out, force, inputs={"checkpoint": checkpoint}))
        bnb = {"quant_type": bnb_quant_type, "blocksize": bnb_blocksize, "double_quant": bnb_double_quant,
               "load_dtype": bnb_load_dtype, "compute_dtype": bnb_compute_dtype}
        plan = plan_merge(checkpoint, base, alpha=alpha, dtype=dtype, family=family,
                          max_shard_size=max_shard_size, device=device, base_weights=base_weights, bnb=bnb,
                          quant_stats=quant_stats)
        stack.callback(plan.close)
        if dry_run:
            if json_out:
                emit_json({"dry_run": True, **plan.as_dict()})
            else:
                print_plan(plan)
            return
        check_not_overlapping(out, {"checkpoint": checkpoint, "base": plan.facts["base"]["path"]})
        if not json_out:
            _print_header(plan)
        with ProgressRenderer() as progress:
            report = run_merge(plan, out, force=force, progress=progress, hash_base=hash_base)
    if json_out:
        emit_json(report)
    else:
        render(report)


def _print_header(plan) -> None:
    """What is about to happen, on stderr (alpha and its source are always shown)."""
    from rich.markup import escape

    from omgtool.cli.output import err

    console = err()
    f = plan.facts
    console.print(escape(f"merge-lora: {Path(f['checkpoint']).name} into {f['base']['path']} "
                         f"({f['base']['resolved_by']}); family {f['family']}, stage {f['stage']}"))
    if f["lora"]:
        console.print(escape(f"merge-lora: alpha {f['alpha']:g} ({f['alpha_source']}); rank {f['lora']['rank']}, "
                             f"scale {f['lora']['scale']:g}; matmuls on {f['device']}"))
    qlora = plan.context.get("qlora")
    if qlora is not None:  # --base-weights, each 4-bit setting and its source, the --dtype suggestion
        for line in qlora.describe_lines(f["dtype"]):
            console.print(escape("merge-lora: " + line.strip()))


def render(report: dict[str, Any]) -> None:
    from rich.markup import escape as esc

    from omgtool.sizes import format_size

    from omgtool.cli.output import out

    console = out()
    c = report["counts"]
    outputs = report.get("outputs", {})
    weights = [k for k in outputs if k.endswith(".safetensors")]
    total = sum(outputs[k]["bytes"] for k in weights)
    console.print(f"[bold]{esc(report['out'])}[/]: {c['merged']} merged, "
                  f"{c['replaced']} replaced, {c['copied']} copied"
                  + (f", {c['converted']} converted" if c["converted"] else "")
                  + f"; {format_size(total)} in {len(weights)} safetensors files, dtype {report['dtype']}, "
                    f"{report['wall_s']:.1f} s")
    lora = report.get("lora")
    if lora:
        console.print(esc(f"LoRA: {lora['num_pairs']} pairs, rank {lora['rank']}, alpha {report['alpha']:g} "
                          f"({report['alpha_source']}), scale {lora['scale']:g}"))
    vocab = report["vocab"]
    if vocab.get("output") != vocab.get("base"):
        console.print(f"vocab: {vocab['base']} -> {vocab['output']} rows (config.json vocab_size)")
    tokens = report["tokens"]["added"]
    if tokens:
        console.print(esc("tokens: " + ", ".join(f"{t['content']} {t['id']}" + ("" if t["embedded"] else
                                                                                  " (no embedding row)")
                                                 for t in tokens)))
    for fname, names in report["side_files"].items():
        console.print(esc(f"{fname}: {len(names)} tensors under their original names"))
    q = report.get("qlora")
    if q:
        s = q["summary"]
        console.print(esc(f"base weights: {q['base_weights']}; 4-bit round trip error over {s['tensors']} weights: "
                          f"median ||q||/||W|| {_num(s['median_q_over_w'])}, median ||q||/||delta|| "
                          f"{_num(s['median_q_over_delta'])} (max {_num(s['max_q_over_delta'])})"))
    console.print("provenance: omgtool-merge.json (sha256 of inputs and outputs, delta norms); README.md")
    for note in report.get("notes", []):
        console.print(f"[yellow]note:[/] {esc(note)}")


def _num(v) -> str:
    return "n/a" if v is None else f"{v:.3g}"
