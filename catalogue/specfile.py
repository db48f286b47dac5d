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
        return fix(f"{source}: unknown key '{where}'", f"remove it or use one of: {', '.join(cls.model_fields)}")
    msg = err["msg"].removeprefix("Value error, ")
    if not err["loc"]:  # a rule across fields: its message names them
        return f"{source}: {msg}"
    return f"{source}: {where}={err.get('input')!r}: {msg}"


def load_spec_file(path: str | Path, cls: type[M], example: str) -> tuple[M, Path]:
    """Parse and validate ``path`` as ``cls``; return it with the file's folder (for relative paths)."""
    p = Path(path)
    if not p.is_file():
        raise SpecError(fix(f"spec {p} not found", f"pass the path of a YAML spec like {example}"))
    try:
        raw: Any = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise SpecError(f"{p}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise SpecError(fix(f"{p}: expected a mapping of keys", f"see {example}"))
    try:
        return cls(**raw), p.resolve().parent
    except ValidationError as e:
        raise SpecError(validation_message(e, cls, str(p))) from None
