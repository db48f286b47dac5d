"""Model files on a node: a Hugging Face repo downloaded once per node into its Hugging Face cache.

Every training worker asks for the model; the first on a node downloads it under a node-wide file lock
(in the cache's own folder), the others on that node wait and then find it complete. The cache is the
node's ``HF_HUB_CACHE`` (``HF_HOME``), so a second job on the node downloads nothing, and with
``HF_HUB_OFFLINE=1`` a pre-populated cache is used as is. ``HF_TOKEN`` reaches the workers through the
job's runtime env (``gpufleet.jobs.upload``) for gated repos.
"""

from __future__ import annotations

import fcntl
from pathlib import Path

from gpufleet.catalogue.errors import SpecError, fix

# Config, tokenizer and weights; not the other formats some repos also carry (original/, *.pth, gguf).
MODEL_FILES = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.tiktoken", "*.py"]


def local_model_dir(model: str) -> Path:
    """A model directory on this node: ``model`` itself when it is one, else the Hub repo ``model``
    from this node's cache, downloaded first if it is not there yet."""
    if Path(model).is_dir():
        return Path(model)
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    cache = Path(constants.HF_HUB_CACHE)
    cache.mkdir(parents=True, exist_ok=True)
    lock = cache / f".gpufleet-{model.replace('/', '--')}.lock"
    with lock.open("w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # one download per node; the rest of the node's workers wait here
        try:
            return Path(snapshot_download(model, allow_patterns=MODEL_FILES, local_files_only=True))
        except LocalEntryNotFoundError:
            pass
        try:
            return Path(snapshot_download(model, allow_patterns=MODEL_FILES))
        except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as e:
            raise SpecError(fix(f"model {model} cannot be downloaded on this node: {str(e).splitlines()[0]}",
                                "check the repo id, give the job HF_TOKEN for a gated repo, or pre-populate the "
                                "nodes' Hugging Face cache")) from None
