"""`omgtool inspect`: what a checkpoint is, from metadata alone (no pickle runs, no data read).

Only `--stats` reads tensor data, one tensor at a time, in bounded chunks.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
from collections import Counter
from pathlib import Path
from typing import Any, Optional

import typer

from omgtool.errors import UnsafeInput
from omgtool.sizes import format_size

MANIFEST_VERSION = 1
STATS_CHUNK = 1 << 24  # elements per chunk for --stats


def build_report(path: Path, *, alpha: float | None = None, family: str | None = None,
                 name_filter: str | None = None) -> tuple[dict[str, Any], Any, Any]:
    """(report, checkpoint, analysis). Raises UnsafeInput / UnreadableInput."""
    from omgtool.formats import open_checkpoint
    from omgtool.infer import analyze
    from omgtool.mapping import group_descriptions, load_registry

    ckpt = open_checkpoint(path)
    registry = load_registry()
    analysis = analyze(ckpt, registry, family=family, alpha=alpha)
    descriptions = group_descriptions(analysis.family, registry) if analysis.family else {}
    selected = [t for t in ckpt.tensors.values()
                if name_filter is None or fnmatch.fnmatchcase(t.name, name_filter)]
    groups = {}
    for group, keys in analysis.groups.items():
        infos = [ckpt.tensors[k] for k in keys]
        groups[group] = {"count": len(keys), "params": sum(i.numel for i in infos),
                         "bytes": sum(i.nbytes for i in infos),
                         "description": descriptions.get(group, "")}
    report = {
        "path": str(path),
        "format": ckpt.format,
        "container": ckpt.container,
        "num_tensors": len(ckpt.tensors),
        "num_params": ckpt.num_params,
        "total_bytes": ckpt.total_bytes,
        "dtypes": dict(Counter(t.dtype for t in ckpt.tensors.values())),
        "tensors": [{"name": t.name, "shape": list(t.shape), "dtype": t.dtype, "bytes": t.nbytes,
                     "group": analysis.matches[t.name].group if t.name in analysis.matches else "unexplained",
                     "location": t.location} for t in selected],
        "architecture": analysis.architecture,
        "groups": {g: v["count"] for g, v in groups.items()},
        "group_details": groups,
        "unexplained": analysis.unexplained,
        "notes": analysis.notes,
        "safety": ckpt.safety.as_dict(),
        "metadata": ckpt.metadata,
    }
    if name_filter is not None:
        report["filter"] = name_filter
    return report, ckpt, analysis


def tensor_stats(ckpt, names: list[str], progress: bool = True) -> dict[str, dict[str, Any]]:
    """min/max/mean/std and NaN/Inf/zero counts, one tensor and one chunk at a time."""
    import torch
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

    total = sum(ckpt.tensors[n].nbytes for n in names)
    out: dict[str, dict[str, Any]] = {}
    with Progress(TextColumn("stats"), BarColumn(), DownloadColumn(), TimeRemainingColumn(),
                  transient=True, disable=not progress, console=_stderr()) as bar:
        task = bar.add_task("stats", total=total)
        for name in names:
            t = ckpt.read(name).reshape(-1)
            n = t.numel()
            acc = {"min": float("inf"), "max": float("-inf"), "sum": 0.0, "sumsq": 0.0,
                   "nan": 0, "inf": 0, "zeros": 0, "finite": 0}
            for start in range(0, n, STATS_CHUNK):
                chunk = t[start:start + STATS_CHUNK].to(torch.float64)
                finite = torch.isfinite(chunk)
                acc["nan"] += int(torch.isnan(chunk).sum())
                acc["inf"] += int(torch.isinf(chunk).sum())
                acc["zeros"] += int((chunk == 0).sum())
                vals = chunk[finite]
                if vals.numel():
                    acc["finite"] += vals.numel()
                    acc["min"] = min(acc["min"], float(vals.min()))
                    acc["max"] = max(acc["max"], float(vals.max()))
                    acc["sum"] += float(vals.sum())
                    acc["sumsq"] += float((vals * vals).sum())
                del chunk, finite, vals
            k = acc["finite"]
            mean = acc["sum"] / k if k else None
            var = max(acc["sumsq"] / k - mean * mean, 0.0) if k else None
            out[name] = {"min": acc["min"] if k else None, "max": acc["max"] if k else None,
                         "mean": mean, "std": var ** 0.5 if var is not None else None,
                         "nan": acc["nan"], "inf": acc["inf"], "zeros": acc["zeros"], "numel": n}
            bar.advance(task, ckpt.tensors[name].nbytes)
            del t
    return out


def update_strength(ckpt, analysis) -> list[dict[str, Any]]:
    """||(alpha/r) B@A||_F per LoRA pair, via r x r Gram matrices (B@A never formed)."""
    from omgtool.lora import delta_norm

    lora = analysis.architecture.get("lora") or {}
    alpha = lora.get("alpha")
    rows = []
    for pair in analysis.lora_pairs:
        a, b = ckpt.read(pair.a_key), ckpt.read(pair.b_key)
        rank = a.shape[0]
        scale = alpha / rank if alpha is not None else 1.0
        rows.append({"component": pair.component, "layer": pair.layer, "module": pair.module,
                     "weight": pair.weight, "rank": rank, "scale": scale,
                     "delta_fro": delta_norm(a, b, scale)})
    return rows


def write_manifest(report: dict[str, Any], out: Path, sha256: str | None) -> None:
    manifest = {"format_version": MANIFEST_VERSION, "source": Path(report["path"]).name,
                "family": report["architecture"].get("family"),
                "stage": report["architecture"].get("stage"),
                "tensors": [{"name": t["name"], "shape": t["shape"], "dtype": t["dtype"]}
                            for t in report["tensors"]]}
    if sha256:
        manifest["sha256"] = sha256
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    tmp.replace(out)


def sha256_files(files: list[Path]) -> str:
    h = hashlib.sha256()
    for f in files:
        with open(f, "rb") as fh:
            while block := fh.read(1 << 24):
                h.update(block)
    return h.hexdigest()


def cli(
    path: Path = typer.Argument(..., help="checkpoint file (.pth/.bin/.pt/.safetensors) or model folder"),
    json_out: bool = typer.Option(False, "--json", help="print one JSON object instead of tables"),
    stats: bool = typer.Option(False, "--stats", help="read tensor data: per-tensor statistics, "
                               "and LoRA update strength per layer and module"),
    name_filter: Optional[str] = typer.Option(None, "--filter", help="only list tensors whose name "
                                              "matches this glob (e.g. '*.lora_B.*')"),
    alpha: Optional[float] = typer.Option(None, "--alpha", help="LoRA alpha, overriding the mapping default"),
    family: Optional[str] = typer.Option(None, "--family", help="force a family mapping (e.g. omg-llava)"),
    manifest: Optional[Path] = typer.Option(None, "--manifest", help="also write a shape manifest "
                                            "JSON (name, shape, dtype of every tensor) to this file"),
    with_hash: bool = typer.Option(False, "--hash", help="record the source sha256 in the manifest"),
) -> None:
    """Show what a checkpoint holds: format, tensors, groups, inferred architecture, safety.

    Reads metadata only; pickles are walked against an allowlist, never executed.
    Exit codes: 0 ok, 2 unreadable input, 3 unsafe pickle (refused).
    """
    from omgtool.console import emit_json

    try:
        report, ckpt, analysis = build_report(path, alpha=alpha, family=family, name_filter=name_filter)
    except UnsafeInput as exc:
        if json_out:
            emit_json({"path": str(path), "safety": {"verdict": "unsafe",
                                                      "findings": [f.as_dict() for f in exc.findings]}})
        raise
    if manifest is not None:
        digest = sha256_files(ckpt.files) if with_hash else None
        manifest_report = dict(report)
        if name_filter is not None:
            manifest_report["tensors"] = [{"name": t.name, "shape": list(t.shape), "dtype": t.dtype}
                                          for t in ckpt.tensors.values()]
        write_manifest(manifest_report, manifest, digest)
        report["manifest"] = {"path": str(manifest), "sha256": digest}
    if stats:
        names = [t["name"] for t in report["tensors"]]
        report["stats"] = tensor_stats(ckpt, names, progress=not json_out)
        report["update_strength"] = update_strength(ckpt, analysis) if analysis.lora_pairs else []
    if json_out:
        emit_json(report)
    else:
        render(report)


def _stderr():
    from omgtool.console import err

    return err()


def _count(n: int) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def render(report: dict[str, Any]) -> None:
    from rich.markup import escape as esc
    from rich.table import Table

    from omgtool.console import out

    console = out()
    arch = report["architecture"]
    console.print(f"[bold]{esc(report['path'])}[/]")
    container = f" (state dict under '{report['container']}')" if report["container"] else ""
    console.print(f"format {report['format']}{container} · {report['num_tensors']} tensors · "
                  f"{_count(report['num_params'])} params · {format_size(report['total_bytes'])} · dtypes "
                  + ", ".join(f"{k}×{v}" for k, v in sorted(report["dtypes"].items())))
    console.print(f"family [bold]{arch['family']}[/] · stage [bold]{arch['stage']}[/]"
                  + (f" — {arch['description']}" if arch.get("description") else ""))

    groups = Table(title="groups", title_justify="left")
    for col in ("group", "tensors", "params", "bytes", "what it is"):
        groups.add_column(col, justify="right" if col in ("tensors", "params", "bytes") else "left")
    for name, g in report["group_details"].items():
        style = "red" if name == "unexplained" else None
        groups.add_row(esc(name), str(g["count"]), _count(g["params"]), format_size(g["bytes"]), esc(g["description"]),
                       style=style)
    console.print(groups)

    table = Table(title="inferred architecture", title_justify="left", show_header=False)
    table.add_column("part")
    table.add_column("values")
    for part, values in arch.items():
        if part in ("family", "stage", "description"):
            continue
        if values is None:
            table.add_row(part, "—")
            continue
        shown = ", ".join(f"{k}={v}" for k, v in values.items() if not k.endswith("_source"))
        sources = "; ".join(f"{k.removesuffix('_source')}: {v}" for k, v in values.items()
                            if k.endswith("_source") and v)
        table.add_row(part, esc(shown) + (f"\n[dim]{esc(sources)}[/]" if sources else ""))
    console.print(table)

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
               "not-a-pickle": "[green]safe[/]: no pickle (safetensors)"}.get(safety["verdict"],
                                                                              safety["verdict"])
    console.print(f"safety {verdict}" + (f" ({esc(', '.join(safety['globals']))})" if safety["globals"] else ""))
    if report.get("filter"):
        _render_tensors(console, report)
    if "stats" in report:
        _render_stats(console, report)
    if report.get("update_strength"):
        _render_heatmap(console, report["update_strength"])
    if report.get("manifest"):
        console.print(f"manifest written to {report['manifest']['path']}")


def _esc(text: str) -> str:
    from rich.markup import escape

    return escape(text)


def _render_tensors(console, report) -> None:
    from rich.table import Table

    table = Table(title=f"tensors matching {report['filter']}", title_justify="left")
    for col in ("name", "shape", "dtype", "group"):
        table.add_column(col)
    for t in report["tensors"]:
        table.add_row(*(_esc(x) for x in (t["name"], str(t["shape"]), t["dtype"], t["group"])))
    console.print(table)


def _render_stats(console, report) -> None:
    from rich.table import Table

    table = Table(title="tensor statistics", title_justify="left")
    for col in ("name", "min", "max", "mean", "std", "nan", "inf", "zeros"):
        table.add_column(col, justify="left" if col == "name" else "right")
    fmt = lambda v: "—" if v is None else f"{v:.4g}"  # noqa: E731
    for name, s in report["stats"].items():
        bad = s["nan"] or s["inf"]
        table.add_row(_esc(name), fmt(s["min"]), fmt(s["max"]), fmt(s["mean"]), fmt(s["std"]),
                      str(s["nan"]), str(s["inf"]), str(s["zeros"]), style="red" if bad else None)
    console.print(table)


def _render_heatmap(console, rows: list[dict[str, Any]]) -> None:
    from rich.table import Table

    modules = list(dict.fromkeys(r["module"] for r in rows))
    layers = list(dict.fromkeys(r["layer"] for r in rows))
    cell = {(r["layer"], r["module"]): r["delta_fro"] for r in rows}
    top = max(cell.values()) or 1.0
    palette = ["grey23", "blue", "cyan", "green", "yellow", "dark_orange", "red"]
    table = Table(title="LoRA update strength ||(alpha/r)·B@A||_F (layer × module)", title_justify="left")
    table.add_column("layer", justify="right")
    for m in modules:
        table.add_column(m, justify="right")
    for layer in layers:
        cells = []
        for m in modules:
            v = cell.get((layer, m))
            if v is None:
                cells.append("")
                continue
            color = palette[min(int(v / top * (len(palette) - 1) + 0.5), len(palette) - 1)]
            cells.append(f"[on {color}] {v:9.3g} [/]")
        table.add_row("—" if layer is None else str(layer), *cells)
    console.print(table)
