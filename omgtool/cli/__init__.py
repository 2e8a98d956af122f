"""The `omgtool` command line: a thin Typer app (`app.py`), one output layer (`output.py`),
and one module per command that parses options, calls `omgtool.ops`, renders, exits."""

from omgtool.cli.app import app, main

__all__ = ["app", "main"]
