"""Option types and argument parsers every command shares: ``--json``, JSON-valued options, and
options built from a dataclass's fields (so a default or help text is written once, on the field).
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import types
import typing
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

import typer

from adapters_mgr.errors import InvalidInput

JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable JSON output.", metavar="")]
WideOpt = Annotated[bool, typer.Option(
    "--wide", help="Table: every column, at full width (default: fit the terminal, leaving columns out).", metavar="")]


def parse_json_option(text: str | None, option: str, example: str, *, object_only: bool = False) -> Any:
    """The value of a JSON-valued option (None when not given); one-line errors that show an example.

    ``object_only``: also refuse anything but a JSON object (for options whose consumer does not
    check the shape itself).
    """
    if text is None:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidInput(f"{option} {text!r} is not valid JSON ({exc.msg}); e.g. '{example}'") from exc
    if object_only and not isinstance(value, dict):
        raise InvalidInput(f"{option} must be a JSON object, e.g. '{example}'")
    return value


def comma_list(value: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """``"query,value"`` -> ``("query", "value")`` (a tuple, e.g. a default, passes through)."""
    if isinstance(value, str):
        return tuple(part.strip() for part in value.split(",") if part.strip())
    return tuple(value)


def int_or_text(value: str | int) -> str | int:
    """``"4"`` -> ``4``; anything else (``"28d"``) stays text."""
    return int(value) if isinstance(value, str) and value.isdigit() else value


_SCALARS = (str, int, float, bool)


def _cli_type(name: str, hint: Any) -> tuple[Any, Callable[[Any], Any] | None, str | None]:
    """How a field's type reads from the command line: (annotation, parser, metavar)."""
    origin = typing.get_origin(hint)
    if hint in _SCALARS:
        return hint, None, None
    if origin is tuple and typing.get_args(hint)[1:] == (Ellipsis,) and typing.get_args(hint)[0] is str:
        return str, comma_list, "<str,...>"
    if origin in (typing.Union, types.UnionType):
        members = [a for a in typing.get_args(hint) if a is not type(None)]
        optional = len(members) < len(typing.get_args(hint))
        if len(members) == 1 and members[0] in _SCALARS:
            return members[0] | None if optional else members[0], None, None
        if set(members) == {str, int}:
            return (str | None) if optional else str, int_or_text, "<str>"
    raise TypeError(f"field {name!r}: no command-line reading for type {hint!r}")


def dataclass_options(cls: type) -> list[inspect.Parameter]:
    """One keyword parameter per field of ``cls``, typed for Typer: ``--field-name`` with the field's
    default, ``metadata["help"]`` and optional ``metadata["min"]`` (a click range: one-line usage error),
    in the help panel the class's ``cli_panels`` names for it (the default panel otherwise)."""
    hints = typing.get_type_hints(cls)
    panel_of = {name: panel for panel, names in getattr(cls, "cli_panels", {}).items() for name in names}
    params = []
    for f in dataclasses.fields(cls):
        annotation, parser, metavar = _cli_type(f.name, hints[f.name])
        extra: dict[str, Any] = {}
        if "min" in f.metadata:
            extra["min"] = f.metadata["min"]
        if parser is not None:
            extra.update(parser=parser, metavar=metavar)
        default = ",".join(f.default) if parser is comma_list else f.default
        option = typer.Option(help=f.metadata.get("help", ""), rich_help_panel=panel_of.get(f.name), **extra)
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY,
                                        default=default, annotation=Annotated[annotation, option]))
    return params


F = TypeVar("F", bound=Callable[..., Any])


def with_dataclass_options(cls: type, *, after: str) -> Callable[[F], F]:
    """Give a command one option per field of ``cls``, listed after its parameter ``after``.

    The command takes them as ``**values`` (a mapping of field name to value, ready for ``cls(**values)``).
    Typer reads the command's parameters from ``inspect.signature``, so this sets ``__signature__``;
    apply it below ``@app.command()``.
    """

    def decorate(func: F) -> F:
        sig = inspect.signature(func, eval_str=True)
        own = [p for p in sig.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
        clash = {p.name for p in own} & {f.name for f in dataclasses.fields(cls)}
        if clash or len(own) == len(sig.parameters):
            raise TypeError(f"{func.__name__} must take **values and no parameter named like a field ({clash})")
        cut = [p.name for p in own].index(after) + 1
        positional = own[:cut]
        rest = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own[cut:]]
        func.__signature__ = sig.replace(parameters=[*positional, *dataclass_options(cls), *rest])  # type: ignore[attr-defined]
        return func

    return decorate


__all__ = ["JsonOpt", "WideOpt", "comma_list", "dataclass_options", "int_or_text", "parse_json_option",
           "with_dataclass_options"]
