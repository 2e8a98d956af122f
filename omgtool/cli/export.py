"""`omgtool export SRC --to llama|peft|safetensors --out PATH`.

The library is `omgtool.ops.export` (export_llama, export_peft, export_safetensors); this
module is the command line: options, a progress bar on stderr, the summary.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from omgtool.cli.options import alpha_option, dtype_option, family_option, \
    force_option, json_option, max_shard_option, out_option
from omgtool.cli.scan import allow_global_option, trusting_globals
from omgtool.errors import InvalidArgument
from omgtool.sizes import format_size

TARGETS = ("llama", "peft", "safetensors")


@trusting_globals
def cli(
    src: Path = typer.Argument(..., help="llama: an InternLM2 HF folder (base or merge-lora output); "
                               "peft: a finetune checkpoint with LoRA; safetensors: any readable checkpoint"),
    to: str = typer.Option(..., "--to", help="llama | peft | safetensors"),
    out: Path = out_option(..., help="output folder (llama, peft); for safetensors a FILE.safetensors "
                           "(that file) or a folder"),
    base_llama: Optional[Path] = typer.Option(None, "--base-llama", help="peft: the base model already "
                                              "exported with --to llama (the adapter's base)"),
    dtype: Optional[str] = dtype_option(help="llama/peft: cast tensors to fp32, fp16 or "
                                        "bf16 (default: keep each source dtype)"),
    alpha: Optional[float] = alpha_option(help="peft: LoRA alpha, overriding the mapping "
                                          "default (OMG-LLaVA: 256)"),
    family: Optional[str] = family_option(help="peft: force a family mapping (e.g. omg-llava)"),
    max_shard_size: str = max_shard_option(help="llama/safetensors folder: "
                                       "largest shard (HF units: 5GB, 500MB, 2GiB)"),
    force: bool = force_option(),
    dry_run: bool = typer.Option(False, "--dry-run", help="print the plan (every output tensor, its source and "
                                 "transform; the files written) and write nothing"),
    json_out: bool = json_option("print one JSON object (the plan with --dry-run, else the export report; "
                                 "errors as {\"error\", \"exit_code\"})"),
    allow_global: list[str] = allow_global_option(),
) -> None:
    """Export a checkpoint for the wider ecosystem.

    --to llama: an InternLM2 HF folder as a LlamaForCausalLM folder (loads in transformers
    without trust_remote_code; vLLM, llama.cpp converters): wqkv split into q/k/v by kv group,
    renames from mappings/conv_internlm2_to_llama.toml, config.json, generation_config.json,
    tokenizer (tokenizer.model + tokenizer.json for LlamaTokenizer, added tokens at their ids),
    projector/extras files carried outside the model index. Sharded, streamed, atomic.

    --to peft: the finetune LoRA as a PEFT adapter on the Llama export given by --base-llama:
    q/k/v LoRAs share A and split B's rows by kv group; the trained embed_tokens / lm_head are
    modules_to_save, with the output's own LoRA folded into lm_head. Load it with
    base.resize_token_embeddings(<checkpoint rows>) then PeftModel.from_pretrained (printed).

    --to safetensors: every tensor with identical names, shapes, dtypes and bytes; metadata
    records the source file name and sha256. Unsafe pickles are refused.

    --dry-run prints the plan (reads headers only, imports no torch) and writes nothing.
    After writing, the output headers are re-read and compared with the plan.
    """
    from contextlib import nullcontext

    from omgtool.cli.output import ProgressRenderer, emit_json, print_plan
    from omgtool.formats.output_dir import reserve_output
    from omgtool.ops import export as lib

    target = to.strip().lower()
    if target not in TARGETS:
        raise InvalidArgument(f"--to must be one of {', '.join(TARGETS)}, not {to!r}")
    if target == "peft" and base_llama is None:
        raise InvalidArgument("--to peft needs --base-llama DIR (the base exported with --to llama)")
    if target != "peft" and (base_llama is not None or alpha is not None or family is not None):
        raise InvalidArgument("--base-llama, --alpha and --family apply to --to peft only")
    if target == "safetensors" and dtype is not None:
        raise InvalidArgument("--to safetensors keeps every dtype; --dtype applies to llama and peft")
    single = target == "safetensors" and out.suffix == ".safetensors"
    if target != "safetensors" and out.suffix == ".safetensors":
        raise InvalidArgument(f"--to {target} writes a folder; --out {out} names a .safetensors file")
    inputs = {"source": src, "base-llama": base_llama}
    reserved = nullcontext() if dry_run else reserve_output(out, force, inputs=inputs, single_file=single)
    with reserved:
        if target == "llama":
            plan = lib.plan_llama(src, out, dtype=dtype, max_shard_size=max_shard_size)
        elif target == "peft":
            plan = lib.plan_peft(src, base_llama, out, alpha=alpha, dtype=dtype, family=family)
        else:
            plan = lib.plan_safetensors(src, out, max_shard_size=max_shard_size)
        if dry_run:
            plan.close()
            if json_out:
                emit_json({"dry_run": True, **plan.as_dict()})
            else:
                print_plan(plan)
            return
        from omgtool.plan.execute import execute

        with ProgressRenderer() as progress:
            report = execute(plan, out, force=force, progress=progress)
    if json_out:
        emit_json(report)
    else:
        render(report)


def render(report: dict[str, Any]) -> None:
    from rich.markup import escape as esc

    from omgtool.cli.output import out

    console = out()
    kind = report["kind"]
    console.print(f"[bold]{esc(report['out'])}[/]: {kind} export of {esc(report['source'])}, "
                  f"{report['num_tensors']} tensors, {format_size(report['bytes'])}; headers re-read and match the plan")
    files = report.get("files", [])
    console.print("files: " + esc(", ".join(files[:8]) + (f" … ({len(files)} in all)" if len(files) > 8 else "")))
    if kind == "llama":
        tok = report.get("tokenizer") or {}
        console.print(f"config: LlamaForCausalLM, vocab {report['vocab_size']}, dtype {report['dtype']}, "
                      f"heads {report['heads']['num_heads']} / kv {report['heads']['num_kv_heads']}")
        if tok.get("files"):
            check = tok.get("check")
            ok = isinstance(check, str)
            console.print(f"tokenizer: {tok.get('tokenizer_class')}, {len(tok.get('added_tokens', {}))} added "
                          f"tokens at their ids" + (", ids identical to SentencePiece on the probe set" if ok else ""))
        if report.get("carried"):
            console.print("carried: " + esc(", ".join(report["carried"])))
        console.print("load: AutoModelForCausalLM.from_pretrained(OUT) (no trust_remote_code)")
    elif kind == "peft":
        console.print(f"LoRA r={report['r']} lora_alpha={report['lora_alpha']:g} "
                      f"({esc(report['lora_alpha_source'])})")
        console.print(f"target_modules: {', '.join(report['target_modules'])}; modules_to_save: "
                      f"{', '.join(report['modules_to_save'])}")
        for name, count in report.get("carried", {}).items():
            console.print(f"carried: {name} ({count} tensors outside the language model)")
        if report.get("resize_token_embeddings"):
            console.print(f"[yellow]before loading, resize the base's embeddings to "
                          f"{report['resize_token_embeddings']} rows:[/]")
        console.print(esc(report["load"]))
    else:
        meta = report["metadata"]
        console.print(f"source {esc(meta.get('source', ''))}"
                      + (f" sha256 {meta['source_sha256']}" if "source_sha256" in meta else ""))
    for note in report.get("notes", []):
        console.print(f"[yellow]note:[/] {esc(note)}")
