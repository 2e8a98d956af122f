"""The CLI's output layer: human / `--json` / `--quiet` modes, tables that never cut a name,
one progress renderer (implementing `omgtool.progress.Progress`), and the error guard that
maps exceptions to one `error:` line (plus one JSON object with `--json`) and an exit code.

Human output is plain lines: a table is aligned columns with every cell printed in full, so
`grep` finds a tensor name in piped output and a narrow terminal wraps a long line instead of
cutting it. Colour only on a terminal, never with `--no-color` or NO_COLOR; plain ASCII when
the locale cannot encode the symbols.
"""

from __future__ import annotations

import codecs
import functools
import json
import os
import sys
import traceback
from typing import Any, Iterable, Sequence

import typer

from omgtool.errors import OmgError

INTERNAL_ERROR = 4
INTERRUPTED = 130


class _State:
    debug: bool = bool(os.environ.get("OMGTOOL_DEBUG"))
    quiet: bool = False
    no_color: bool = False
    json: bool = False
    json_emitted: bool = False  # the command printed its JSON result: an error after it adds no second object


state = _State()


def reset_state() -> None:
    """Back to the defaults (each CLI invocation starts from here; tests run many in one process)."""
    state.debug = bool(os.environ.get("OMGTOOL_DEBUG"))
    state.quiet = False
    state.no_color = False
    state.json = False
    state.json_emitted = False


# --- encoding ---------------------------------------------------------------------------------

_ASCII = {"·": "|", "×": "x", "—": "-", "–": "-", "→": "->", "←": "<-", "…": "...", "‖": "||", "Δ": "d",
          "≤": "<=", "≥": ">=", "≈": "~", "±": "+-", "−": "-", "✓": "ok", "✗": "x", "’": "'", "“": '"', "”": '"'}


def _ascii_fallback(exc: UnicodeError):
    if not isinstance(exc, UnicodeEncodeError):
        raise exc
    text = exc.object[exc.start:exc.end]
    return "".join(_ASCII.get(ch, "?") for ch in text), exc.end


codecs.register_error("omgtool-ascii", _ascii_fallback)


def make_streams_safe() -> None:
    """A locale that cannot encode our symbols (LC_ALL=C without UTF-8 mode) gets ASCII
    stand-ins instead of a UnicodeEncodeError."""
    for stream in (sys.stdout, sys.stderr):
        encoding = getattr(stream, "encoding", None) or "ascii"
        try:
            "·→…".encode(encoding)
        except (UnicodeEncodeError, LookupError):
            if hasattr(stream, "reconfigure"):
                stream.reconfigure(errors="omgtool-ascii")


# --- consoles ---------------------------------------------------------------------------------

def _no_color() -> bool:
    return state.no_color or bool(os.environ.get("NO_COLOR"))


def _console(stderr: bool):
    from rich.console import Console  # lazily: --json output never needs rich

    stream = sys.stderr if stderr else sys.stdout
    tty = stream.isatty()
    kwargs: dict[str, Any] = {}
    if not tty:
        kwargs["width"] = 1 << 16  # piped: never wrap (lines are as long as their content)
    class _Console(Console):
        def on_broken_pipe(self) -> None:  # rich exits 1; a closed pipe is not an error here
            self.quiet = True
            raise BrokenPipeError(32, "Broken pipe")

    return _Console(file=stream, stderr=stderr, soft_wrap=True, highlight=False, emoji=False,
                   quiet=state.quiet, no_color=_no_color(), color_system="auto" if tty and not _no_color() else None,
                   **kwargs)


def out():
    """The console for results (stdout). Quiet with -q."""
    return _console(stderr=False)


def err():
    """The console for progress and notes (stderr). Quiet with -q."""
    return _console(stderr=True)


def emit_json(obj: Any) -> None:
    json.dump(obj, sys.stdout, indent=2, default=str)  # streamed: no whole-document string in memory
    sys.stdout.write("\n")
    sys.stdout.flush()
    state.json_emitted = True


def note(text: str) -> None:
    """A one-line note on stderr (suppressed by -q)."""
    if state.quiet:
        return
    from rich.markup import escape

    err().print(f"[yellow]note:[/] {escape(text)}")


def error_line(text: str) -> None:
    sys.stderr.write(f"error: {' '.join(str(text).split())}\n")
    sys.stderr.flush()


# --- tables -----------------------------------------------------------------------------------

def print_table(console, title: str | None, headers: Sequence[str], rows: Iterable[Sequence[Any]], *,
                right: Iterable[int] = (), styles: Sequence[str | None] | None = None,
                cell_styles: Sequence[Sequence[str | None]] | None = None, indent: str = "  ") -> None:
    """Aligned plain columns, every cell in full (no ellipsis, no folding). The last column is
    not padded. `right`: indexes of right-aligned columns; `styles`: a rich style per row;
    `cell_styles`: a rich style per cell."""
    from rich.markup import escape

    rows = [[("" if c is None else str(c)) for c in row] for row in rows]
    right = set(right)
    widths = [len(h) for h in headers]
    for row in rows:
        for i, c in enumerate(row):
            widths[i] = max(widths[i], len(c))
    last = len(headers) - 1

    def line(cells: Sequence[str], row_style: str | None, cstyles: Sequence[str | None] | None) -> str:
        parts = []
        for i, c in enumerate(cells):
            if i == last and i not in right:
                padded = c
            else:
                padded = c.rjust(widths[i]) if i in right else c.ljust(widths[i])
            text = escape(padded)
            if cstyles is not None and cstyles[i]:
                text = f"[{cstyles[i]}]{text}[/]"
            parts.append(text)
        body = indent + "  ".join(parts).rstrip()
        return f"[{row_style}]{body}[/]" if row_style else body

    if title:
        console.print(f"[bold]{escape(title)}[/]")
    console.print(line(list(headers), "bold", None))
    for n, row in enumerate(rows):
        console.print(line(row, styles[n] if styles else None, cell_styles[n] if cell_styles else None))


# --- progress ---------------------------------------------------------------------------------

class ProgressRenderer:
    """`omgtool.progress.Progress` on stderr: a rich bar per task on a terminal; nothing when
    stderr is not a terminal, with --json or -q. Notes always print (unless -q)."""

    def __init__(self, enabled: bool | None = None):
        if enabled is None:
            enabled = sys.stderr.isatty() and not state.quiet and not state.json
        self.enabled = enabled
        self._bar = None
        self._task = None

    def task(self, label: str, total: int | None = None, unit: str = "B") -> None:
        self.close()
        if not self.enabled:
            return
        from rich.progress import BarColumn, DownloadColumn, MofNCompleteColumn, Progress, TextColumn, \
            TimeRemainingColumn

        count = DownloadColumn() if unit == "B" else MofNCompleteColumn()
        self._bar = Progress(TextColumn(label), BarColumn(), count, TimeRemainingColumn(), transient=True,
                             console=err())
        self._bar.start()
        self._task = self._bar.add_task(label, total=total)

    def advance(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.advance(self._task, n)

    def note(self, text: str) -> None:
        if self._bar is not None:
            from rich.markup import escape

            self._bar.console.print(f"[yellow]note:[/] {escape(text)}")
        else:
            note(text)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
            self._task = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def silence_stdout() -> None:
    """After EPIPE: point stdout at /dev/null so later writes and the final flush stay quiet."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):
        pass


# --- errors -----------------------------------------------------------------------------------

def _json_error(message: str, code: int, extra: dict | None = None) -> None:
    try:
        emit_json({"error": message, "exit_code": code, **(extra or {})})
    except BrokenPipeError:
        raise
    except OSError:
        pass


def fail(message: str, code: int, extra: dict | None = None) -> None:
    """Report an error the CLI way: one line on stderr, and with --json one object on stdout."""
    error_line(message)
    if state.json and not state.json_emitted:
        _json_error(" ".join(message.split()), code, extra)


def guarded(fn):
    """Run a command; typed errors become one `error:` line (and with --json one JSON object on
    stdout) and their exit code. A closed stdout pipe is left to the caller (exit 0, quiet)."""
    from omgtool.formats.output_dir import Terminated, note_sink

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if kwargs.get("json_out"):
            state.json = True
        token = note_sink.set(note)
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, SystemExit):
            raise
        except BrokenPipeError:  # the reader went away (`| head`): not an error
            silence_stdout()
            raise typer.Exit(0) from None
        except OmgError as exc:
            if state.debug:
                traceback.print_exc()
            extra = None
            if getattr(exc, "findings", None):
                extra = {"safety": {"verdict": "unsafe", "findings": [f.as_dict() for f in exc.findings]}}
            fail(exc.one_line(), exc.exit_code, extra)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            fail("interrupted", INTERRUPTED)
            raise typer.Exit(INTERRUPTED) from None
        except Terminated as exc:
            fail(f"terminated ({exc})", exc.exit_code)
            raise typer.Exit(exc.exit_code) from None
        except OSError as exc:
            if state.debug:
                traceback.print_exc()
            where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
            fail(f"{where}{exc.strerror or exc}", 2)
            raise typer.Exit(2) from None
        except Exception as exc:  # a bug: say so in one line, traceback only with --debug
            if state.debug:
                traceback.print_exc()
            fail(f"internal error: {type(exc).__name__}: {exc} (rerun with --debug for the traceback)",
                 INTERNAL_ERROR)
            raise typer.Exit(INTERNAL_ERROR) from None
        finally:
            note_sink.reset(token)

    return wrapper


def print_plan(plan) -> None:
    from rich.markup import escape

    console = out()
    for line in plan.describe().splitlines():
        console.print(escape(line))
    console.print("[dim]dry run: nothing written[/]")
