"""Read a YAML spec file into a pydantic model; any problem becomes one line naming the field."""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from gpufleet.catalogue.errors import SpecError, fix

M = TypeVar("M", bound=BaseModel)


def validation_message(e: ValidationError, cls: type[BaseModel], source: str) -> str:
    """The first error of ``e`` as 'source: field=value: rule', unknown keys with the known ones."""
    err = e.errors()[0]
    where = ".".join(str(p) for p in err["loc"]) or "spec"
    if err["type"] == "extra_forbidden":
        return fix(f"{source}: unknown key '{where}'",
                   f"remove it or use one of: {', '.join(_section(cls, err['loc'][:-1]).model_fields)}")
    msg = err["msg"].removeprefix("Value error, ")
    if not err["loc"]:  # a rule across fields: its message names them
        return f"{source}: {msg}"
    return f"{source}: {where}={err.get('input')!r}: {msg}"


def _section(cls: type[BaseModel], loc: tuple) -> type[BaseModel]:
    """The model of the section ``loc`` names (``lora`` in ``lora.rr``; list items and dict values included)."""
    for part in loc:
        if isinstance(part, int) or part not in getattr(cls, "model_fields", {}):
            continue  # a list index or dict key: the item's model is the field's
        inner = _models_in(cls.model_fields[part].annotation)
        if not inner:
            break
        cls = inner[0]
    return cls


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic models an annotation holds (``X``, ``list[X]``, ``X | None``, ``dict[str, X]``)."""
    import typing

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for a in typing.get_args(annotation) for m in _models_in(a)]


def read_yaml(path: Path) -> Any:
    """A YAML file's data; a syntax error is one line with the file, line and column."""
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise SpecError(fix(f"{where}: not valid YAML ({problem})", "correct the YAML syntax there")) from None


def load_spec_file(path: str | Path, cls: type[M], example: str) -> tuple[M, Path]:
    """Parse and validate ``path`` as ``cls``; return it with the file's folder (for relative paths)."""
    p = Path(path)
    if not p.is_file():
        raise SpecError(fix(f"spec {p} not found", f"pass the path of a YAML spec like {example}"))
    raw = read_yaml(p)
    if not isinstance(raw, dict):
        raise SpecError(fix(f"{p}: expected a mapping of keys", f"see {example}"))
    try:
        return cls(**raw), p.resolve().parent
    except ValidationError as e:
        raise SpecError(validation_message(e, cls, str(p))) from None
