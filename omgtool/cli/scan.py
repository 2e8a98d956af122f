"""`omgtool scan PATH...`: a safety verdict for every file, without running any pickle.

Also the shared `--allow-global` option of inspect, diff, merge-lora and export.
"""

from __future__ import annotations

import functools
import json
import sys
import time
from pathlib import Path

import typer

ALLOW_HELP = ("trust this global (MODULE.NAME, repeatable), e.g. argparse.Namespace: accepts "
              "'unknown' globals only, never 'dangerous' ones; the pickle is still never run")


def allow_global_option():
    return typer.Option([], "--allow-global", metavar="MODULE.NAME", help=ALLOW_HELP)


def trusting_globals(fn):
    """Run a command with its `allow_global` option as the readers' scan policy."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from omgtool.formats.scan import scan_policy
        from omgtool.ops.scan import check_allowed

        with scan_policy(allow_globals=check_allowed(kwargs.get("allow_global") or ())):
            return fn(*args, **kwargs)

    return wrapper


def cli(
    paths: list[Path] = typer.Argument(..., help="files or folders (recursive; an HF cache folder works)"),
    json_out: bool = typer.Option(False, "--json", help="one JSON object per file (JSON lines)"),
    allow_global: list[str] = allow_global_option(),
) -> None:
    """Scan files for pickles that would run code: every pickle stream, whatever the container.

    Verdicts: safe (only allowlisted globals, or no pickle), unknown (globals outside the
    allowlist: a real load would import and run them), dangerous (can run commands, touch
    files, import, eval), unreadable. One line per file (path, verdict, kind, worst
    finding) and a summary on stderr; --json prints one JSON object per file instead.

    Exit codes: 3 if any file is unknown or dangerous, else 2 if any is unreadable, else 0.
    """
    from omgtool.ops.scan import check_allowed, exit_code, iter_files, scan_one

    allow = check_allowed(allow_global)
    counts: dict[str, int] = {}
    start = time.perf_counter()
    for path in iter_files(paths):
        row = scan_one(path, allow)
        counts[row["verdict"]] = counts.get(row["verdict"], 0) + 1
        if json_out:
            sys.stdout.write(json.dumps(row) + "\n")
        else:
            sys.stdout.write(_line(row) + "\n")
    sys.stdout.flush()
    elapsed = time.perf_counter() - start
    total = sum(counts.values())
    summary = ", ".join(f"{counts[v]} {v}" for v in ("safe", "unknown", "dangerous", "unreadable") if v in counts)
    rate = f", {total / elapsed:.0f} files/s" if elapsed > 0 and total else ""
    sys.stderr.write(f"scanned {total} file{'s' if total != 1 else ''}: {summary or 'none'}{rate}\n")
    code = exit_code(counts)
    if code:
        raise typer.Exit(code)


def _line(row: dict) -> str:
    worst = row["findings"][0] if row["findings"] else None
    if row["verdict"] == "unreadable":
        detail = row["error"] or ""
    elif worst is not None:
        where = f"{worst['member']}@{worst['offset']}" if worst["member"] else f"@{worst['offset']}"
        detail = f"{worst['global']} ({worst['opcode']} {where}): {worst['why']}"
        if len(row["findings"]) > 1:
            detail += f" (+{len(row['findings']) - 1} more)"
    else:
        detail = ""
    return "\t".join(x for x in (row["path"], row["verdict"], row["kind"] or "-", detail) if x is not None)
