"""Click options generated from pydantic config fields: each default, choice list and help text is
written once, on the field (vLLM's ``EngineArgs`` habit)."""

from __future__ import annotations

import types
import typing
from collections.abc import Callable
from typing import Any, Literal

import click
from pydantic import BaseModel, ValidationError
from pydantic_core import PydanticUndefined

from gpufleet.catalogue.errors import SpecError


def _click_type(annotation: Any) -> tuple[Any, bool]:
    """(click type, is a boolean flag) for a field annotation; ``X | None`` is X."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    if typing.get_origin(annotation) is Literal:
        return click.Choice([str(a) for a in typing.get_args(annotation)]), False
    if annotation is bool:
        return bool, True
    return annotation, False


def options_from(model: type[BaseModel], *fields: str, names: dict[str, str] | None = None
                 ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorate a command with one option per field of ``model``: ``--field-name`` (or the name in
    ``names``), its type, choices, default and the field's description as help."""
    names = names or {}

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        for field in reversed(fields):
            info = model.model_fields[field]
            flag = names.get(field, "--" + field.replace("_", "-"))
            kind, is_flag = _click_type(info.annotation)
            decl = f"{flag}/--no-{flag[2:]}" if is_flag else flag
            # click 8.3+ counts an explicit default=None as a value: a required field gets no default at all,
            # so a missing option is click's own one line ("Missing option '--gpu'").
            extra: dict[str, Any] = {} if info.is_required() else {
                "default": None if info.default is PydanticUndefined else info.default,
                "show_default": info.default not in (None, PydanticUndefined)}
            fn = click.option(decl, field, type=None if is_flag else kind, required=info.is_required(),
                              help=info.description, **extra)(fn)
        return fn

    return decorate


def validated(cls: type[BaseModel], names: dict[str, str] | None = None, **kwargs: Any) -> Any:
    """Build a pydantic config from command-line options, turning a validation error into one SpecError line
    that names the option (``names``: the flags ``options_from`` renamed), never the class."""
    try:
        return cls(**kwargs)
    except ValidationError as e:
        err = e.errors()[0]
        msg = err["msg"].removeprefix("Value error, ")
        if not err["loc"]:  # a rule across options: its message names them
            raise SpecError(msg) from None
        field = str(err["loc"][0])
        flag = (names or {}).get(field, "--" + field.replace("_", "-"))
        raise SpecError(f"{flag}={err.get('input')!r}: {msg}") from None


RENAMED_UNTIL = "gpufleet 0.2"


def notice_renamed(old_flag: str, new_flag: str) -> None:
    """The one-line notice a former flag name prints."""
    click.echo(f"notice: {old_flag} is now {new_flag}; {old_flag} is accepted until {RENAMED_UNTIL}", err=True)


def renamed(old_flag: str, field: str, new_flag: str, kind: Any = int,
            values: dict[str, str] | None = None) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """A hidden option for a flag's former name: its value (translated by ``values`` where the spelling of
    the values changed too) is kept for ``field`` (see ``with_renamed``) and a one-line notice names the new flag."""

    def keep(ctx: click.Context, _param: click.Parameter, value: Any) -> None:
        if value is not None:
            notice_renamed(old_flag, new_flag)
            ctx.meta.setdefault("gpufleet.renamed", {})[field] = (values or {}).get(value, value)

    return click.option(old_flag, type=kind, hidden=True, expose_value=False, callback=keep,
                        help=f"Former name of {new_flag}.")


def with_renamed(options: dict[str, Any]) -> dict[str, Any]:
    """``options`` with the values given under former flag names, where the new flag was not given."""
    ctx = click.get_current_context()
    given = ctx.meta.get("gpufleet.renamed", {})
    return {**options, **{k: v for k, v in given.items()
                          if ctx.get_parameter_source(k) in (None, click.core.ParameterSource.DEFAULT)}}
