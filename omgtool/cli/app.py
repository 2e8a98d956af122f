"""The `omgtool` command line: a thin Typer layer over omgtool.cli.

Each command module defines `cli(...)` (options, help) and the library functions it
calls; heavy imports (torch, transformers) happen inside those functions, so
`inspect` starts fast.
"""

from __future__ import annotations

import importlib
import os

# The CLI uses no pydantic plugins; skipping their entry-point scan saves start-up time.
os.environ.setdefault("PYDANTIC_DISABLE_PLUGINS", "__all__")

import typer  # noqa: E402

from omgtool import __version__  # noqa: E402
from omgtool.cli.output import guarded, state  # noqa: E402

app = typer.Typer(
    name="omgtool",
    help="Checkpoint forensics and conversion for OMG-LLaVA and other LLaVA-family checkpoints.\n\n"
         "Exit codes: 0 ok; 1 differences found / check failed; 2 unreadable input or bad "
         "arguments; 3 unsafe pickle refused; 4 internal error.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain click help: paragraphs are re-wrapped to the terminal width
    context_settings={"help_option_names": ["-h", "--help"]},
)

# command name -> module under omgtool.cli
COMMANDS = {
    "inspect": "inspect",
    "diff": "diff",
    "merge-lora": "merge",
    "export": "export",
    "verify": "verify",
    "scan": "scan",
}


def _version(value: bool) -> None:
    if value:
        typer.echo(f"omgtool {__version__}")
        raise typer.Exit(0)


@app.callback()
def _main(
    debug: bool = typer.Option(False, "--debug", help="show full tracebacks on errors"),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="print the version and exit"),
) -> None:
    state.debug = debug or bool(os.environ.get("OMGTOOL_DEBUG"))


for _name, _module in COMMANDS.items():
    try:
        _mod = importlib.import_module(f"omgtool.cli.{_module}")
    except ModuleNotFoundError as _exc:
        if _exc.name != f"omgtool.cli.{_module}":
            raise
        continue  # command not built yet
    app.command(_name, help=_mod.cli.__doc__)(guarded(_mod.cli))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
