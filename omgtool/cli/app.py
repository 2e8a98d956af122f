"""The `omgtool` command line: a thin Typer app that builds only the command it runs.

Each command module under omgtool.cli defines `cli(...)` (options, help); heavy imports
(torch, transformers) happen inside it. `OmgGroup` imports a command's module only when that
command is invoked (all of them only for the top-level --help), and owns the process-level
conventions: usage errors as one `error:` line (one JSON object with --json), a closed
stdout pipe exits 0 quietly, SIGTERM/SIGHUP exit 143/129 after cleanup.
"""

from __future__ import annotations

import importlib
import os
import sys

# The CLI uses no pydantic plugins; skipping their entry-point scan saves start-up time.
os.environ.setdefault("PYDANTIC_DISABLE_PLUGINS", "__all__")

import typer  # noqa: E402
from typer.core import TyperGroup  # noqa: E402

from omgtool import __version__  # noqa: E402
from omgtool.cli import plain_values  # noqa: E402
from omgtool.cli.output import INTERRUPTED, fail, make_streams_safe, reset_state, silence_stdout, state  # noqa: E402

# command name -> module under omgtool.cli
COMMANDS = {
    "inspect": "inspect",
    "diff": "diff",
    "merge-lora": "merge",
    "export": "export",
    "verify": "verify",
    "scan": "scan",
}

_SETTINGS = {"help_option_names": ["-h", "--help"]}


def build_command(name: str):
    """The click command for one subcommand, built from its module alone."""
    from omgtool.cli.options import epilog, with_common_options
    from omgtool.cli.output import guarded

    try:
        mod = importlib.import_module(f"omgtool.cli.{COMMANDS[name]}")
    except ModuleNotFoundError as exc:
        if exc.name != f"omgtool.cli.{COMMANDS[name]}":
            raise
        return None  # command not built yet
    single = typer.Typer(add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None,
                         context_settings=_SETTINGS)
    single.command(name, help=mod.cli.__doc__, epilog=epilog(name))(guarded(with_common_options(mod.cli)))
    command = typer.main.get_command(single)
    command.name = name
    plain_values.install(command)  # its values coerced without importing pydantic
    return command


class OmgGroup(TyperGroup):
    def list_commands(self, ctx):
        return list(COMMANDS)

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        cache = self.__dict__.setdefault("_built", {})
        if name not in cache:
            cache[name] = build_command(name)
        return cache[name]

    def resolve_command(self, ctx, args):
        from omgtool.errors import InvalidArgument

        name = args[0] if args else None
        if name is not None and name not in COMMANDS and not name.startswith("-"):
            raise InvalidArgument(f"no command {name!r}; commands: {', '.join(COMMANDS)}")
        return super().resolve_command(ctx, args)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        plain_values.install(self)

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        code = run_main(super().main, sys.argv[1:] if args is None else list(args), prog_name)
        if standalone_mode:
            sys.exit(code)
        return code


def run_main(click_main, args: list[str], prog_name) -> int:
    """Run the click entry point with our conventions; returns the exit code."""
    from typer import Abort, Exit, TyperException

    from omgtool.errors import OmgError
    from omgtool.formats.output_dir import Terminated, terminate_as_exception

    reset_state()
    make_streams_safe()
    options = args[:args.index("--")] if "--" in args else args
    state.json = "--json" in options
    state.debug = state.debug or "--debug" in options
    try:
        with terminate_as_exception():
            rv = click_main(args=args, prog_name=prog_name or "omgtool", standalone_mode=False)
            sys.stdout.flush()
        return rv if isinstance(rv, int) else 0
    except Exit as exc:
        return exc.exit_code
    except BrokenPipeError:
        silence_stdout()
        return 0
    except OmgError as exc:  # raised while choosing the command
        fail(exc.one_line(), exc.exit_code)
        return exc.exit_code
    except TyperException as exc:  # usage errors: one line, the command's --help named
        ctx = getattr(exc, "ctx", None)
        if type(exc).__name__ == "NoArgsIsHelpError":
            sys.stdout.write(exc.format_message() + "\n")
            return exc.exit_code
        hint = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
        fail(exc.format_message() + hint, exc.exit_code)
        return exc.exit_code
    except Abort:
        fail("interrupted", INTERRUPTED)
        return INTERRUPTED
    except Terminated as exc:
        fail(f"terminated ({exc})", exc.exit_code)
        return exc.exit_code


def _version(value: bool) -> None:
    if value:
        typer.echo(f"omgtool {__version__}")
        raise typer.Exit(0)


app = typer.Typer(
    name="omgtool",
    cls=OmgGroup,
    help="Checkpoint forensics and conversion for OMG-LLaVA and other LLaVA-family checkpoints.\n\n"
         "Exit codes: 0 ok; 1 differences found / check failed; 2 unreadable input or bad "
         "arguments; 3 unsafe pickle refused; 4 internal error; 130 interrupted (Ctrl-C); "
         "143 terminated (SIGTERM; 129 SIGHUP).\n\n"
         "Mappings (architecture data) ship inside the package; OMGTOOL_MAPPINGS=DIR overrides them.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain click help: paragraphs are re-wrapped to the terminal width
    context_settings=_SETTINGS,
)


@app.callback()
def _main(
    debug: bool = typer.Option(False, "--debug", help="show full tracebacks on errors (also after the command)"),
    quiet: bool = typer.Option(False, "-q", "--quiet", help="print nothing but errors and --json output"),
    no_color: bool = typer.Option(False, "--no-color", help="no colour (also NO_COLOR=1)"),
    version: bool = typer.Option(False, "--version", "-V", callback=_version, is_eager=True,
                                 help="print the version and exit"),
) -> None:
    state.debug = state.debug or debug or bool(os.environ.get("OMGTOOL_DEBUG"))
    state.quiet = state.quiet or quiet
    state.no_color = state.no_color or no_color


def main() -> None:
    app()


if __name__ == "__main__":
    main()
