"""Option types shared by the commands, the options every command accepts (`--debug`,
`-q/--quiet`, `--no-color`, before or after the subcommand), and the exit-code epilog
every `--help` ends with."""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable

import typer

EXIT_CODES_COMMON = ("2 unreadable input or bad arguments; 3 unsafe pickle refused (never executed); "
                     "4 internal error (a bug: rerun with --debug and report the traceback); "
                     "130 interrupted (Ctrl-C); 143 terminated (SIGTERM; 129 for SIGHUP). "
                     "An interrupted or failed write leaves nothing at --out.")

# per command: what 0 and 1 mean
EXIT_CODES = {
    "inspect": "0 ok",
    "diff": "0 no differences (within tolerance); 1 differences found",
    "merge-lora": "0 merged (or planned, with --dry-run); 1 the written output does not match its plan",
    "export": "0 exported; 1 the written output does not match its plan",
    "verify": "0 all checks passed (skipped ones named); 1 a check failed",
}


def epilog(command: str) -> str:
    head = EXIT_CODES.get(command, "0 ok")
    return f"Exit codes: {head}; {EXIT_CODES_COMMON}"


def out_option(default: Any = ..., help: str = "output folder") -> Any:
    return typer.Option(default, "--out", "-o", "--output", help=help)


def force_option(help: str = "replace an existing --out, but only an empty folder or one omgtool "
                            "wrote (an omgtool-*.json record inside); anything else is refused") -> Any:
    return typer.Option(False, "--force", help=help)


def json_option(help: str = "print one JSON object on stdout (errors too: {\"error\", \"exit_code\"})") -> Any:
    return typer.Option(False, "--json", help=help)


def alpha_option(help: str = "LoRA alpha, overriding the mapping default") -> Any:
    return typer.Option(None, "--alpha", help=help)


def family_option(help: str = "force a family mapping (e.g. omg-llava)") -> Any:
    return typer.Option(None, "--family", help=help)


def dtype_option(help: str) -> Any:
    return typer.Option(None, "--dtype", help=help)


def max_shard_option(help: str) -> Any:
    return typer.Option("5GB", "--max-shard-size", help=help)


def device_option(help: str = "auto, cpu, cuda or cuda:N") -> Any:
    return typer.Option("auto", "--device", help=help)


# --- options every command takes --------------------------------------------------------------

_COMMON = [
    inspect.Parameter("debug", inspect.Parameter.KEYWORD_ONLY, annotation=bool,
                      default=typer.Option(False, "--debug", help="show the full traceback on errors")),
    inspect.Parameter("quiet", inspect.Parameter.KEYWORD_ONLY, annotation=bool,
                      default=typer.Option(False, "-q", "--quiet", help="print nothing but errors (and "
                                           "--json output); the exit code is the answer")),
    inspect.Parameter("no_color", inspect.Parameter.KEYWORD_ONLY, annotation=bool,
                      default=typer.Option(False, "--no-color", help="plain output without colour "
                                           "(also NO_COLOR=1)")),
]


def with_common_options(fn: Callable) -> Callable:
    """`fn` plus --debug / -q / --no-color, which set the output state and are not passed on."""
    from omgtool.cli.output import state

    params = list(inspect.signature(fn).parameters.values())
    taken = {p.name for p in params}

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        for p in _COMMON:
            if p.name in kwargs and p.name not in taken:
                value = kwargs.pop(p.name)
                if value:
                    setattr(state, p.name, True)
        return fn(*args, **kwargs)

    extra = [p for p in _COMMON if p.name not in taken]
    positional = [p for p in params if p.kind != inspect.Parameter.VAR_KEYWORD]
    wrapper.__signature__ = inspect.Signature(positional + extra)
    wrapper.__annotations__ = {**getattr(fn, "__annotations__", {}), **{p.name: bool for p in extra}}
    return wrapper

