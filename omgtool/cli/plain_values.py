"""Command-line values without pydantic.

Typer 0.29 coerces every parameter's value through a pydantic TypeAdapter, built the first time
the parameter is processed; the pydantic import that needs is about a third of a short command's
start-up (docs/benchmarks.md, start-up). omgtool's parameters are all plain: str, int, float,
bool, Path and lists of those, so `install` gives each such parameter of a built command a
coercion that gives the same values and refusals without pydantic (tests/test_plain_values.py
checks it against Typer's own). Any other annotation, constraint or parser keeps Typer's
coercion, and so does every parameter when this Typer has no such hook (the command then only
starts slower).
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path
from typing import Any, get_args, get_origin

_INT_WITH_ZERO_FRACTION = re.compile(r"[+-]?[0-9][0-9_]*\.0+")


def to_int(text: str) -> int:
    """As pydantic's lax int from a string: ASCII digits, surrounding space and `_` allowed,
    a fraction of only zeros accepted (`5.0`)."""
    s = text.strip()
    if not s.isascii():
        raise ValueError("Input should be a valid integer, unable to parse string as an integer")
    if _INT_WITH_ZERO_FRACTION.fullmatch(s):
        s = s.split(".", 1)[0]
    try:
        return int(s)
    except ValueError:
        raise ValueError("Input should be a valid integer, unable to parse string as an integer") from None


def to_float(text: str) -> float:
    """As pydantic's lax float from a string: Python's float syntax, ASCII only."""
    if not text.isascii():
        raise ValueError("Input should be a valid number, unable to parse string as a number")
    try:
        return float(text)
    except ValueError:
        raise ValueError("Input should be a valid number, unable to parse string as a number") from None


_SCALARS = {str, int, float, bool, Path}


def _leaf(descriptor) -> Any | None:
    """The plain scalar type a parameter's values have, or None where Typer must coerce."""
    info = descriptor.parameter_info
    if (descriptor.is_file or descriptor.is_choice or descriptor.is_datetime or info.parser is not None
            or info.clamp or getattr(info, "path_type", None) not in (None, Path)):
        return None
    annotation = descriptor.annotation
    if get_origin(annotation) is list:
        (annotation,) = get_args(annotation) or (None,)
    return annotation if annotation in _SCALARS else None


@lru_cache(maxsize=1)
def _runtime_class():
    from dataclasses import dataclass

    from typer._click.exceptions import BadParameter
    from typer._coercion import RuntimeParam
    from typer._param_types import coerce_cli_path

    @dataclass(frozen=True)
    class PlainRuntimeParam(RuntimeParam):
        """Typer's RuntimeParam (it handles missing and multiple values) for a plain leaf type."""

        leaf: type = str

        def _coerce_value(self, value: Any, param, ctx) -> Any:
            if isinstance(value, (list, tuple)):
                return [self._one(v, param, ctx) for v in value]
            return self._one(value, param, ctx)

        def _one(self, value: Any, param, ctx) -> Any:
            leaf = self.leaf
            info = self.parameter_info
            try:
                if leaf is Path:
                    return coerce_cli_path(value if isinstance(value, Path) else Path(value), info,
                                           path_type=Path, param=param, ctx=ctx)
                if isinstance(value, leaf) and not (leaf is int and isinstance(value, bool)):
                    number = value
                elif not isinstance(value, str):
                    raise ValueError(f"Input should be a valid {leaf.__name__}")
                elif leaf is str:
                    return value
                elif leaf is bool:
                    return _to_bool(value)
                else:
                    number = to_int(value) if leaf is int else to_float(value)
            except ValueError as exc:
                raise BadParameter(str(exc), ctx=ctx, param=param) from None
            if leaf in (int, float):
                if info.min is not None and number < info.min:
                    raise BadParameter(f"Input should be greater than or equal to {info.min}", ctx=ctx, param=param)
                if info.max is not None and number > info.max:
                    raise BadParameter(f"Input should be less than or equal to {info.max}", ctx=ctx, param=param)
            return number

    return PlainRuntimeParam


_TRUE = {"1", "on", "t", "true", "y", "yes"}
_FALSE = {"", "0", "off", "f", "false", "n", "no"}


def _to_bool(text: str) -> bool:
    s = text.strip().lower()
    if s in _TRUE:
        return True
    if s in _FALSE:
        return False
    raise ValueError("Input should be a valid boolean, unable to interpret input")


def install(command) -> int:
    """Give every plain parameter of `command` (a built click command) the pydantic-free
    coercion; returns how many got it (0 when this Typer has no such hook)."""
    try:
        runtime = _runtime_class()
    except (ImportError, AttributeError, TypeError):
        return 0
    params = list(command.params)
    try:  # the -h/--help option is made (and kept) on first parse: make it now, as that would
        help_option = command.get_help_option(command.context_class(command, **(command.context_settings or {})))
    except (AttributeError, TypeError):
        help_option = None
    if help_option is not None:
        params.append(help_option)
    done = 0
    for param in params:
        descriptor = getattr(param, "type_descriptor", None)
        if descriptor is None or getattr(param, "_runtime_param", False) is not None:
            continue
        try:
            leaf = _leaf(descriptor)
        except AttributeError:  # a Typer whose descriptors differ: its own coercion
            leaf = None
        if leaf is None:
            continue
        param._runtime_param = runtime(parameter_info=descriptor.parameter_info,
                                       annotation=descriptor.annotation, leaf=leaf)
        done += 1
    return done
