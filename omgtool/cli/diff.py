"""`omgtool diff A B`: what changed between two checkpoints, or a checkpoint and a manifest.

The library is `omgtool.ops.diff` (pairing, streaming value deltas); this module is the
command line and the human-readable rendering.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from omgtool.cli.options import json_option
from omgtool.cli.scan import allow_global_option, trusting_globals

DEFAULT_SHOWN = 25
NUMERIC = {"max_abs", "rel_l2", "cosine", "mismatched", "numel", "rows_a", "rows_b", "count", "first", "last"}


@trusting_globals
def cli(
    a: Path = typer.Argument(..., help="first checkpoint (file or folder) or manifest JSON"),
    b: Path = typer.Argument(..., help="second checkpoint (file or folder) or manifest JSON"),
    json_out: bool = json_option("print one JSON object instead of tables (errors as {\"error\", \"exit_code\"})"),
    shapes_only: bool = typer.Option(False, "--shapes-only", help="compare names, shapes and dtypes; "
                                     "read no tensor data"),
    atol: float = typer.Option(0.0, "--atol", help="absolute tolerance: |a-b| <= atol + rtol*|b| "
                               "elementwise counts as equal (default 0: exact)"),
    rtol: float = typer.Option(0.0, "--rtol", help="relative tolerance (default 0: exact)"),
    no_normalize: bool = typer.Option(False, "--no-normalize", help="pair keys by exact name only "
                                      "(default: pair through PEFT wrappers and family prefixes "
                                      "using mappings/)"),
    strict: bool = typer.Option(False, "--strict", help="against a manifest, also count a "
                                "checkpoint's unexplained extra keys as differences"),
    check_hash: bool = typer.Option(False, "--hash", help="also compare the checkpoint's sha256 "
                                    "with the one recorded in the manifest (inspect --manifest --hash)"),
    show: int = typer.Option(DEFAULT_SHOWN, "--show", min=1, help="rows shown per table (all with --json)"),
    allow_global: list[str] = allow_global_option(),
) -> None:
    """Compare two checkpoints, or a checkpoint with a manifest: keys only in A or B, shape,
    dtype and value changes, rows added to embedding/output tables.

    Keys pair through PEFT wrappers and family prefixes (llm.model.X = llm.base_model.model.model.X,
    output.weight = output.base_layer.weight, an InternLM2 folder = the llm. part of an OMG-LLaVA
    file); each pair is shown with both names. Values stream one tensor at a time: max |a-b|,
    relative L2 ||a-b||/||a||, cosine. Against a manifest (inspect --manifest) only names, shapes
    and dtypes compare, a null dtype is not checked, and a checkpoint's extra keys that no mapping
    explains are listed as unexplained but do not fail (--strict makes them fail).
    """
    from omgtool.cli.output import ProgressRenderer, emit_json
    from omgtool.ops.diff import Tolerance, diff_sides, open_side

    tol = Tolerance(atol=atol, rtol=rtol)
    side_a = open_side(a)
    side_b = open_side(b)
    with ProgressRenderer() as bar:
        report = diff_sides(side_a, side_b, normalize=not no_normalize, shapes_only=shapes_only, tol=tol,
                            strict=strict, check_hash=check_hash, progress=bar)
    if json_out:
        emit_json(report)
    else:
        render(report, show)
    if report["differences"]:
        raise typer.Exit(1)


def _fmt(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _cell(row: dict, key: str) -> str:
    if key == "pair":  # both original names of a matched pair, once when equal
        return row["a"] if row["a"] == row["b"] else f"{row['a']} → {row['b']}"
    return _fmt(row.get(key))


def render(report: dict[str, Any], show: int = DEFAULT_SHOWN) -> None:
    from rich.markup import escape as esc

    from omgtool.cli.output import out, print_table

    console = out()
    for label in ("a", "b"):
        s = report[label]
        console.print(f"[bold]{label.upper()}[/] {esc(s['path'])} · {esc(s['format'])} · {s['num_tensors']} "
                      f"tensors · family {s['family']} · stage {s['stage']}")
    summary = report["summary"]
    how = "normalized names (mappings/)" if report["normalized"] else "exact names (--no-normalize)"
    console.print(f"paired {summary['paired']} tensors by {how}; {summary['renamed']} under different names")

    def table(title: str, rows: list[dict], cols: list[tuple[str, str]], style: str | None = None,
              note: str = "") -> None:
        if not rows:
            return
        print_table(console, f"{title} ({len(rows)}){note}", [header for _, header in cols],
                    [[_cell(row, key) for key, _ in cols] for row in rows[:show]],
                    right=[i for i, (key, _) in enumerate(cols) if key in NUMERIC],
                    styles=[style] * min(len(rows), show))
        if len(rows) > show:
            console.print(f"  … {len(rows) - show} more (--show N, or --json)")

    listed = [("name", "name"), ("shape", "shape"), ("dtype", "dtype"), ("group", "group")]
    table("only in A", report["only_in_a"], listed, "red")
    table("only in B", report["only_in_b"], listed, "green")
    for label in ("a", "b"):
        ignored = report["unexplained_ignored"][label]
        table(f"unexplained, only in {label.upper()}", report[f"unexplained_only_in_{label}"], listed,
              "yellow" if ignored else "red", " — no mapping explains them" + ("; not counted" if ignored else ""))
    table("renamed (paired through the mappings)", report["renamed"],
          [("a", "A name"), ("b", "B name")], "dim")
    table("shape changed", report["shape_changed"],
          [("pair", "A → B"), ("shape_a", "shape A"), ("shape_b", "shape B")], "red")
    table("dtype changed", report["dtype_changed"],
          [("pair", "A → B"), ("dtype_a", "dtype A"), ("dtype_b", "dtype B")], "red")
    rows_cols = [("pair", "A → B"), ("rows_a", "rows A"), ("rows_b", "rows B"), ("count", "count"),
                 ("first", "first"), ("last", "last"), ("shared_rows_identical", "shared identical")]
    table("rows added in B", report["rows_added"], rows_cols, "yellow")
    table("rows removed in B", report["rows_removed"], rows_cols, "yellow")
    delta_cols = [("pair", "A → B"), ("max_abs", "max |a-b|"), ("rel_l2", "rel L2"),
                  ("cosine", "cosine"), ("mismatched", "mismatched"), ("numel", "of")]
    table("values changed", report["value_changed"], delta_cols, "red")
    table("within tolerance (not identical)", report["within_tolerance"], delta_cols)
    if report["values_compared"]:
        tol = report["tolerance"]
        how = "exact" if not (tol["atol"] or tol["rtol"]) else f"atol {tol['atol']:g}, rtol {tol['rtol']:g}"
        console.print(f"values: {report['identical']} of {report['values_checked']} compared tensors identical, "
                      f"{summary['within_tolerance']} within tolerance, {summary['value_changed']} changed ({how})")
    if "hash" in report:
        h = report["hash"]
        console.print(f"sha256 {'[green]matches[/]' if h['match'] else '[red]differs[/]'}: "
                      f"expected {h['expected']}, got {h['actual']}")
    for note in report["notes"]:
        console.print(f"[yellow]note:[/] {esc(note)}")
    if report["differences"]:
        parts = ", ".join(f"{k.replace('_', ' ').replace(' a', ' A').replace(' b', ' B')} {v}"
                          for k, v in summary.items()
                          if v and k not in ("paired", "renamed", "identical", "within_tolerance"))
        n = report["differences"]
        console.print(f"[red bold]{n} difference{'s' if n != 1 else ''}[/] ({parts})")
    else:
        console.print("[green bold]no differences[/]")
