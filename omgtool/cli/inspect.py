"""`omgtool inspect`: what a checkpoint is, from metadata alone (no pickle runs, no data read).

Only `--stats` reads tensor data, one tensor at a time, in bounded chunks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from omgtool.cli.options import alpha_option, family_option, json_option
from omgtool.cli.scan import allow_global_option, trusting_globals
from omgtool.errors import InvalidArgument, UnsafeInput
from omgtool.formats.hashing import sha256_files
from omgtool.ops.inspect import build_report, tensor_stats, update_strength, write_manifest
from omgtool.sizes import format_size


@trusting_globals
def cli(
    path: Path = typer.Argument(..., help="checkpoint file (.pth/.bin/.pt/.safetensors) or model folder"),
    json_out: bool = json_option("print one JSON object instead of tables (errors as {\"error\", \"exit_code\"})"),
    stats: bool = typer.Option(False, "--stats", help="read tensor data: per-tensor statistics, "
                               "and LoRA update strength per layer and module"),
    name_filter: Optional[str] = typer.Option(None, "--filter", help="only list tensors whose name "
                                              "matches this glob (e.g. '*.lora_B.*')"),
    alpha: Optional[float] = alpha_option(help="LoRA alpha, overriding the mapping default"),
    family: Optional[str] = family_option(help="force a family mapping (e.g. omg-llava)"),
    manifest: Optional[Path] = typer.Option(None, "--manifest", help="also write a shape manifest "
                                            "JSON (name, shape, dtype of every tensor) to this file"),
    with_hash: bool = typer.Option(False, "--hash", help="record each source file's sha256 in the manifest"),
    force: bool = typer.Option(False, "--force", help="overwrite an existing --manifest file"),
    allow_global: list[str] = allow_global_option(),
) -> None:
    """Show what a checkpoint holds: format, tensors, groups, inferred architecture, safety.

    Reads metadata only; pickles are walked against an allowlist, never executed.
    An unknown or dangerous pickle is still reported (tensors from the opcode walk), then
    exits 3. Exit codes: 0 ok, 2 unreadable input, 3 unsafe pickle.
    """
    from omgtool.cli.output import emit_json

    if manifest is not None:  # before reading anything: never overwrite a pinned manifest or the input
        from omgtool.formats.output_dir import check_not_overlapping, check_replaceable

        check_not_overlapping(manifest, {"checkpoint": path}, option="--manifest")
        if manifest.exists() and not force:
            raise InvalidArgument(f"--manifest {manifest} already exists (use --force to overwrite it)")
        if manifest.is_dir():
            check_replaceable(manifest, force, single_file=True, option="--manifest")
    report, ckpt, analysis = build_report(path, alpha=alpha, family=family, name_filter=name_filter,
                                          refuse_unsafe=False)
    if ckpt.safety.verdict in ("unknown", "dangerous"):
        if json_out:
            emit_json(report)
        else:
            render(report)
        raise UnsafeInput(path, ckpt.safety.findings, ckpt.safety.verdict)
    if manifest is not None:
        digest = sha256_files(ckpt.files) if with_hash else None
        manifest_report = dict(report)
        if name_filter is not None:
            manifest_report["tensors"] = [{"name": t.name, "shape": list(t.shape), "dtype": t.dtype}
                                          for t in ckpt.tensors.values()]
        write_manifest(manifest_report, manifest, digest)
        report["manifest"] = {"path": str(manifest), "sha256": digest}  # {file name: sha256}
    if stats:
        names = [t["name"] for t in report["tensors"]]
        report["stats"] = _stats_with_progress(ckpt, names, show=not json_out)
        report["update_strength"] = update_strength(ckpt, analysis) if analysis.lora_pairs else []
    if json_out:
        emit_json(report)
    else:
        render(report)


def _stats_with_progress(ckpt, names: list[str], show: bool) -> dict[str, dict[str, Any]]:
    from omgtool.cli.output import ProgressRenderer

    with ProgressRenderer(None if show else False) as bar:
        return tensor_stats(ckpt, names, progress=bar)


def _count(n: int) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def render(report: dict[str, Any]) -> None:
    from rich.markup import escape as esc

    from omgtool.cli.output import out, print_table

    console = out()
    arch = report["architecture"]
    console.print(f"[bold]{esc(report['path'])}[/]")
    container = f" (state dict under '{report['container']}')" if report["container"] else ""
    console.print(f"format {report['format']}{container} · {report['num_tensors']} tensors · "
                  f"{_count(report['num_params'])} params · {format_size(report['total_bytes'])} · dtypes "
                  + ", ".join(f"{k}×{v}" for k, v in sorted(report["dtypes"].items())))
    console.print(f"family [bold]{arch['family']}[/] · stage [bold]{arch['stage']}[/]"
                  + (f" — {esc(arch['description'])}" if arch.get("description") else ""))

    groups = report["group_details"]
    print_table(console, "groups", ("group", "tensors", "params", "bytes", "what it is"),
                [(name, g["count"], _count(g["params"]), format_size(g["bytes"]), g["description"])
                 for name, g in groups.items()],
                right=(1, 2, 3), styles=["red" if name == "unexplained" else None for name in groups])

    rows, styles = [], []
    for part, values in arch.items():
        if part in ("family", "stage", "description"):
            continue
        if values is None:
            rows.append((part, "—"))
            styles.append(None)
            continue
        rows.append((part, ", ".join(f"{k}={v}" for k, v in values.items() if not k.endswith("_source"))))
        styles.append(None)
        for k, v in values.items():
            if k.endswith("_source") and v:
                rows.append(("", f"{k.removesuffix('_source')}: {v}"))
                styles.append("dim")
    print_table(console, "inferred architecture", ("part", "values"), rows, styles=styles)

    if report["unexplained"]:
        console.print(f"[red]unexplained keys ({len(report['unexplained'])})[/], carried through "
                      "conversions:")
        for key in report["unexplained"][:50]:
            console.print(f"  {esc(key)}")
        if len(report["unexplained"]) > 50:
            console.print(f"  … {len(report['unexplained']) - 50} more (use --json)")
    for note in report["notes"]:
        console.print(f"[yellow]note:[/] {esc(note)}")
    safety = report["safety"]
    verdict = {"safe": "[green]safe[/]: only allowlisted globals",
               "not-a-pickle": "[green]safe[/]: no pickle (safetensors)",
               "unknown": "[yellow]unknown[/]: globals outside the allowlist (loading runs them)",
               "dangerous": "[red]dangerous[/]: loading would run code"}.get(safety["verdict"],
                                                                          esc(safety["verdict"]))
    console.print(f"safety {verdict}" + (f" ({esc(', '.join(safety['globals']))})" if safety["globals"] else ""))
    for f in safety["findings"][:20]:
        console.print(f"  {f['grade']:9} {esc(f['global'])} ({f['opcode']} {esc(f['member'])}@{f['offset']}): "
                      f"{esc(f['why'])}")
    if report.get("filter"):
        _render_tensors(console, report)
    if "stats" in report:
        _render_stats(console, report)
    if report.get("update_strength"):
        _render_heatmap(console, report["update_strength"])
    if report.get("manifest"):
        console.print(f"manifest written to {esc(report['manifest']['path'])}")


def _render_tensors(console, report) -> None:
    from omgtool.cli.output import print_table

    print_table(console, f"tensors matching {report['filter']}", ("name", "shape", "dtype", "group"),
                [(t["name"], str(t["shape"]), t["dtype"], t["group"]) for t in report["tensors"]])


def _render_stats(console, report) -> None:
    from omgtool.cli.output import print_table

    fmt = lambda v: "—" if v is None else f"{v:.4g}"  # noqa: E731
    rows, styles = [], []
    for name, s in report["stats"].items():
        rows.append((name, fmt(s["min"]), fmt(s["max"]), fmt(s["mean"]), fmt(s["std"]), s["nan"], s["inf"],
                     s["zeros"]))
        styles.append("red" if s["nan"] or s["inf"] else None)
    print_table(console, "tensor statistics", ("name", "min", "max", "mean", "std", "nan", "inf", "zeros"), rows,
                right=range(1, 8), styles=styles)


def _render_heatmap(console, rows: list[dict[str, Any]]) -> None:
    from omgtool.cli.output import print_table

    modules = list(dict.fromkeys(r["module"] for r in rows))
    layers = list(dict.fromkeys(r["layer"] for r in rows))
    cell = {(r["layer"], r["module"]): r["delta_fro"] for r in rows}
    top = max(cell.values()) or 1.0
    palette = ["grey23", "blue", "cyan", "green", "yellow", "dark_orange", "red"]
    table, colors = [], []
    for layer in layers:
        values = [cell.get((layer, m)) for m in modules]
        table.append(["—" if layer is None else str(layer)] + ["" if v is None else f"{v:.4g}" for v in values])
        colors.append([None] + [None if v is None else
                                f"on {palette[min(int(v / top * (len(palette) - 1) + 0.5), len(palette) - 1)]}"
                                for v in values])
    print_table(console, "LoRA update strength ||scale·B@A||_F (layer × module)", ["layer", *modules], table,
                right=range(len(modules) + 1), cell_styles=colors)
