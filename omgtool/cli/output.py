"""Shared CLI plumbing: consoles, JSON output, the error guard that maps exceptions to exit codes."""

from __future__ import annotations

import functools
import json
import os
import sys
import traceback
from typing import Any

import typer

from omgtool.errors import OmgError

INTERNAL_ERROR = 4
INTERRUPTED = 130


class _State:
    debug: bool = bool(os.environ.get("OMGTOOL_DEBUG"))
    quiet: bool = False


state = _State()


def out():
    from rich.console import Console  # lazily: --json output never needs rich

    return Console(soft_wrap=False, highlight=False)


def err():
    from rich.console import Console

    return Console(stderr=True, highlight=False)


def emit_json(obj: Any) -> None:
    json.dump(obj, sys.stdout, indent=2, default=str)  # streamed: no whole-document string in memory
    sys.stdout.write("\n")
    sys.stdout.flush()


def error_line(text: str) -> None:
    sys.stderr.write(f"error: {' '.join(str(text).split())}\n")
    sys.stderr.flush()


def guarded(fn):
    """Run a command; typed errors become one `error:` line and their exit code."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, SystemExit):
            raise
        except OmgError as exc:
            if state.debug:
                traceback.print_exc()
            error_line(exc.one_line())
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            error_line("interrupted")
            raise typer.Exit(INTERRUPTED) from None
        except OSError as exc:
            if state.debug:
                traceback.print_exc()
            where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
            error_line(f"{where}{exc.strerror or exc}")
            raise typer.Exit(2) from None
        except Exception as exc:  # a bug: say so in one line, traceback only with --debug
            if state.debug:
                traceback.print_exc()
            error_line(f"internal error: {type(exc).__name__}: {exc} (rerun with --debug for the traceback)")
            raise typer.Exit(INTERNAL_ERROR) from None

    return wrapper
