"""Where a model comes from: a local model directory (config.json, weights, tokenizer).

Training and serving both load a model directory with ``from_pretrained``; this is the one check
that the directory is loadable, made before anything is reserved. Planning reads only config.json.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from catalogue.errors import SpecError, fix

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


def resolve(base: Path, value: str) -> Path:
    """A spec's path: absolute as given, else relative to the spec file's folder ``base``."""
    q = Path(value).expanduser()
    return q if q.is_absolute() else (base / q).resolve()


def check_model_dir(model_dir: Path, field: str = "model") -> dict[str, Any]:
    """The model's config, after checking the directory holds a config.json and a tokenizer."""
    cfg_file = model_dir / "config.json"
    if not cfg_file.is_file():
        raise SpecError(fix(f"{field}: {model_dir} has no config.json",
                            f"point {field} at a Hugging Face model directory (python -m jobs.tiny_model DIR makes one)"))
    if not any((model_dir / f).exists() for f in TOKENIZER_FILES):
        raise SpecError(fix(f"{field}: {model_dir} has no tokenizer", "save the tokenizer into the model directory"))
    try:
        return json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise SpecError(fix(f"{field}: {cfg_file} is not valid JSON ({e.msg} at line {e.lineno})",
                            "restore the model's config.json")) from None


def model_source(source: str, base: Path, field: str = "source") -> tuple[str, dict[str, Any]]:
    """What a loader opens for ``source`` and the config to plan from.

    A model directory (absolute, or relative to the spec) is checked and loaded from; a built-in
    catalogue name that is not a directory plans from its shipped config.json and is handed on by
    name (``--emit-config`` for a cluster that holds the model under that name).
    """
    from catalogue.model import builtin_models

    model_dir = resolve(base, source)
    if source in builtin_models() and not model_dir.exists():
        return source, json.loads(builtin_models()[source].read_text())
    return str(model_dir), check_model_dir(model_dir, field)
