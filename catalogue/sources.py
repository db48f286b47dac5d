"""Where a model comes from: a local model directory, a built-in name, a Hugging Face repo id or a
cloud URI, and the config.json planning reads from it (never the weights; of the Hub, only config.json).

Training and serving both load a model directory with ``from_pretrained``; ``check_model_dir`` is the
one check that a directory is loadable, made before anything is reserved.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from gpufleet.catalogue.errors import SpecError, fix

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


def resolve(base: Path, value: str) -> Path:
    """A spec's path: absolute as given, else relative to the spec file's folder ``base``."""
    q = Path(value).expanduser()
    return q if q.is_absolute() else (base / q).resolve()


def is_uri(path: str | Path) -> bool:
    """A location in a bucket (s3://, gs://) or named by URL (file://): read where the job or replica runs."""
    return "://" in str(path)


def check_model_dir(model_dir: Path, field: str = "model") -> dict[str, Any]:
    """The model's config, after checking the directory holds a config.json and a tokenizer."""
    cfg_file = model_dir / "config.json"
    if not cfg_file.is_file():
        raise SpecError(fix(f"{field}: {model_dir} has no config.json",
                            f"point {field} at a Hugging Face model directory (python -m gpufleet.jobs.tiny_model DIR makes one)"))
    if not any((model_dir / f).exists() for f in TOKENIZER_FILES):
        raise SpecError(fix(f"{field}: {model_dir} has no tokenizer", "save the tokenizer into the model directory"))
    return _read_json(cfg_file, field)


# Built-in names -> the Hugging Face repositories their config.json values come from.
HF_REPOS: dict[str, str] = {
    "gemma-2-2b": "google/gemma-2-2b", "gemma-2-9b": "google/gemma-2-9b", "gemma-2-27b": "google/gemma-2-27b",
    "gemma-3-1b": "google/gemma-3-1b-pt", "llama-3.1-8b": "meta-llama/Llama-3.1-8B",
    "llama-3.1-70b": "meta-llama/Llama-3.1-70B", "llama-3.1-405b": "meta-llama/Llama-3.1-405B",
    "llama-3.2-1b": "meta-llama/Llama-3.2-1B", "llama-3.2-3b": "meta-llama/Llama-3.2-3B",
    "mistral-7b-v0.3": "mistralai/Mistral-7B-v0.3", "mixtral-8x7b": "mistralai/Mixtral-8x7B-v0.1",
    "phi-3-mini-4k": "microsoft/Phi-3-mini-4k-instruct", "phi-3-medium-4k": "microsoft/Phi-3-medium-4k-instruct",
    "qwen1.5-moe-a2.7b": "Qwen/Qwen1.5-MoE-A2.7B", "qwen2.5-0.5b": "Qwen/Qwen2.5-0.5B", "qwen2.5-1.5b": "Qwen/Qwen2.5-1.5B",
    "qwen2.5-3b": "Qwen/Qwen2.5-3B", "qwen2.5-7b": "Qwen/Qwen2.5-7B", "qwen2.5-14b": "Qwen/Qwen2.5-14B",
    "qwen2.5-32b": "Qwen/Qwen2.5-32B", "qwen2.5-72b": "Qwen/Qwen2.5-72B", "qwen3-8b": "Qwen/Qwen3-8B",
    "qwen3-30b-a3b": "Qwen/Qwen3-30B-A3B",
    "llama-3.2-11b-vision": "meta-llama/Llama-3.2-11B-Vision", "llama-3.2-90b-vision": "meta-llama/Llama-3.2-90B-Vision",
    "llava-1.5-7b": "llava-hf/llava-1.5-7b-hf", "qwen2-vl-7b": "Qwen/Qwen2-VL-7B-Instruct",
}
REMOTE_SCHEMES = ("s3://", "gs://")
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def model_source(source: str, base: Path, field: str = "source", config: str | None = None
                 ) -> tuple[str, dict[str, Any]]:
    """What a loader opens for ``source`` and the config.json to plan from; nothing is downloaded.

    * a local model directory (absolute, or relative to the spec): checked, loaded from;
    * a built-in catalogue name: its Hugging Face repository, planned from the shipped config;
    * a Hugging Face repo id (``org/name``): planned from its ``config.json`` (the local Hugging Face
      cache's, else that one file from the Hub), loaded by id where the model runs;
    * ``s3://`` or ``gs://``: handed to Ray Serve LLM, which mirrors it on each replica; planned
      from ``config`` (a local copy of its config.json).
    """
    from gpufleet.catalogue.model import builtin_models, builtin_name

    if source.startswith(REMOTE_SCHEMES):
        if not config:
            raise SpecError(fix(f"{field}: {source} is remote and gpufleet plans from a local config.json",
                                "set the entry's config: to a local copy of the model's config.json"))
        return source, _read_json(resolve(base, config), f"{field} config")
    model_dir = resolve(base, source)
    if model_dir.exists() or source.startswith(("/", ".", "~")):
        return str(model_dir), check_model_dir(model_dir, field)
    if builtin := builtin_name(source):
        return HF_REPOS[builtin], json.loads(builtin_models()[builtin].read_text())
    if REPO_ID.match(source):
        return source, _cached_config(source, field)
    raise SpecError(fix(f"{field}: {source!r} is neither a model directory, a built-in name, a Hugging Face "
                        "repo id nor an s3:// or gs:// URI", "point it at a model directory or a repo id"))


def _cached_config(repo_id: str, field: str) -> dict[str, Any]:
    """config.json of ``repo_id``: from the local Hugging Face cache, else that one file from the Hub
    (unless ``HF_HUB_OFFLINE``); never the weights."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, "config.json")
    if not isinstance(found, str):
        try:
            found = hf_hub_download(repo_id, "config.json")
        except Exception as e:  # offline, unknown or gated repo, no network: one line, the cause first
            raise SpecError(fix(f"{field}: {repo_id}: config.json is not in the Hugging Face cache and cannot be "
                                f"fetched ({type(e).__name__})",
                                f"check the repo id; for a gated repo export HF_TOKEN; offline, run "
                                f"`huggingface-cli download {repo_id} config.json` where there is network "
                                "(or set HF_HUB_CACHE)")) from None
    return _read_json(Path(found), field)


def _read_json(path: Path, field: str) -> dict[str, Any]:
    if not path.is_file():
        raise SpecError(fix(f"{field}: {path} not found", "pass the path of the model's config.json"))
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise SpecError(fix(f"{field}: {path} is not valid JSON ({e.msg} at line {e.lineno})",
                            "restore the model's config.json")) from None
