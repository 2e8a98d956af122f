"""`omgtool merge-lora CHECKPOINT --base BASE --out DIR`.

The library is `omgtool.ops.merge` (plan_merge, MergePlan.describe, run_merge); this module is
the command line: options, a progress bar on stderr, the summary.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Optional

import typer

from omgtool.errors import InvalidArgument, OmgError


def cli(
    checkpoint: Path = typer.Argument(..., help="finetune or pretrain checkpoint (.pth, .safetensors, "
                                      "DeepSpeed or PEFT adapter folder)"),
    base: Optional[str] = typer.Option(None, "--base", help="base model: a folder, or a name such as "
                                       "internlm2-chat-7b or internlm/internlm2-chat-7b (looked up in the "
                                       "current directory, beside the checkpoint, then the local HuggingFace "
                                       "cache; never downloaded)"),
    out: Optional[Path] = typer.Option(None, "--out", help="output folder (refused if it exists, unless --force)"),
    alpha: Optional[float] = typer.Option(None, "--alpha", help="LoRA alpha (default: the family mapping's, "
                                          "256 for OMG-LLaVA, or adapter_config.json's)"),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="output dtype bf16, fp16 or fp32 (default: the "
                                        "base's dtype; untouched tensors are then copied bit-exactly)"),
    family: Optional[str] = typer.Option(None, "--family", help="force a family mapping (e.g. omg-llava)"),
    max_shard_size: str = typer.Option("5GB", "--max-shard-size", help="largest model shard (HF sizes: 5GB, "
                                       "200MB, 200KB, 2GiB)"),
    device: str = typer.Option("auto", "--device", help="where the LoRA matmuls run: auto (cuda when "
                               "available), cpu, cuda or cuda:N"),
    dry_run: bool = typer.Option(False, "--dry-run", help="print the plan (merged, replaced, copied) "
                                 "and write nothing"),
    hash_base: bool = typer.Option(True, "--hash-base/--no-hash-base", help="record the base shards' sha256 "
                                   "(hashed on a background thread while merging); --no-hash-base records "
                                   "their sizes only"),
    force: bool = typer.Option(False, "--force", help="replace an existing --out folder"),
    json_out: bool = typer.Option(False, "--json", help="print one JSON object (the plan with --dry-run, "
                                  "else the merge report)"),
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

    Exit codes: 0 merged (or planned, with --dry-run); 1 the written output does not match its
    plan; 2 unreadable input, bad arguments, or base and checkpoint do not match; 3 unsafe
    pickle refused; 130 interrupted.
    """
    from omgtool.cli.output import emit_json
    from omgtool.ops.merge import plan_merge, run_merge

    try:
        if out is None and not dry_run:
            raise InvalidArgument("--out is required (or use --dry-run)")
        if out is not None and not dry_run and out.exists() and not force:
            raise InvalidArgument(f"{out} already exists (use --force to replace it)")
        plan = plan_merge(checkpoint, base, alpha=alpha, dtype=dtype, family=family,
                          max_shard_size=max_shard_size, device=device)
        if dry_run:
            plan.close()
            if json_out:
                emit_json({"dry_run": True, **plan.as_dict()})
            else:
                _print_plan(plan)
            return
        if not json_out:
            _print_header(plan)
        with _progress(plan, enabled=not json_out and sys.stderr.isatty()) as progress:
            report = run_merge(plan, out, force=force, progress=progress, hash_base=hash_base)
    except OmgError as exc:
        if json_out:
            emit_json({"checkpoint": str(checkpoint), "base": base, "out": str(out) if out else None,
                       "error": exc.one_line(), "exit_code": exc.exit_code})
        raise
    if json_out:
        emit_json(report)
    else:
        render(report)


def _print_plan(plan) -> None:
    from rich.markup import escape

    from omgtool.cli.output import out

    console = out()
    for line in plan.describe().splitlines():
        console.print(escape(line))
    console.print("[dim]dry run: nothing written[/]")


def _print_header(plan) -> None:
    """What is about to happen, on stderr (alpha and its source are always shown)."""
    from rich.markup import escape

    from omgtool.cli.output import err

    console = err()
    lora = plan.lora_summary()
    console.print(escape(f"merge-lora: {plan.checkpoint.name} into {plan.base.path} "
                         f"({plan.base.how}); family {plan.family}, stage {plan.stage}"))
    if lora:
        console.print(escape(f"merge-lora: alpha {plan.alpha:g} ({plan.alpha_source}); rank {lora['rank']}, "
                             f"scale {lora['scale']:g}; matmuls on {plan.device}"))


class _progress:
    """Rich progress on stderr: tensors done, GB written, ETA. A no-op callback when disabled."""

    def __init__(self, plan, enabled: bool):
        self.plan = plan
        self.enabled = enabled
        self.bar = None

    def __enter__(self):
        if not self.enabled:
            return lambda name, nbytes: None
        from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, \
            TimeElapsedColumn, TimeRemainingColumn

        from omgtool.cli.output import err

        self.bar = Progress(TextColumn("merge-lora"), BarColumn(), TextColumn("{task.fields[tensors]}"),
                            DownloadColumn(), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                            transient=True, console=err())
        self.bar.__enter__()
        total = len(self.plan.items)
        task = self.bar.add_task("merge", total=self.plan.total_bytes, tensors=f"0/{total} tensors")
        done = [0]

        def update(name: str, nbytes: int) -> None:
            done[0] += 1
            self.bar.update(task, advance=nbytes, tensors=f"{done[0]}/{total} tensors")

        return update

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.__exit__(*exc)


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
    console.print("provenance: omgtool-merge.json (sha256 of inputs and outputs, delta norms); README.md")
    for note in report.get("notes", []):
        console.print(f"[yellow]note:[/] {esc(note)}")
