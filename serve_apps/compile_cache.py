"""vLLM's torch.compile cache, carried through storage so that a replica on a fresh node starts as if warm.

A warm start skips the graph compilation vLLM does on first start (12-15 s of a 1B model's cold start on an H100,
more for larger ones; docs/benchmarks.md). That cache lives on the node's disk, so every new node compiles again.
With a serve spec's ``storage:``, each replica keeps the cache in a node-local folder of its own key (model,
engine arguments, vLLM and torch versions, GPU type), shared by the model's replicas and restarts on that node;
the first replica on a node restores ``<storage>/compile-cache/<key>.tar.gz`` into it before its engine starts,
and a replica that finds no archive in storage uploads what it compiled once its engine is up.
vLLM checks its own hash inside the cache, so an archive that does not fit is recompiled, never misused.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import tarfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import unquote, urlparse

from gpufleet.catalogue.sources import is_uri
from gpufleet.cluster.adapter_store import storage

logger = logging.getLogger("ray.serve")
STORE_ENV = "GPUFLEET_COMPILE_CACHE_STORE"  # the spec's storage URI, in the replica's environment
ROOT_ENV = "GPUFLEET_COMPILE_CACHE_ROOT"  # node-local parent of the keyed folders
DEFAULT_ROOT = "~/.cache/gpufleet/compile-cache"
RESTORED = ".gpufleet-restored"  # in a keyed folder: storage was consulted on this node (restored or not there)


def cache_key(model_source: str, engine_kwargs: dict[str, Any], accelerator: str, versions: dict[str, str]) -> str:
    """What a compiled graph depends on, as a short hash: the model, the engine arguments, the GPU type and the
    versions of vLLM and torch."""
    data = {"model": model_source, "engine": engine_kwargs, "accelerator": accelerator, "versions": versions}
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def node_folder(key: str) -> Path:
    """The node-local folder for ``key`` (vLLM's cache root for the replicas that share it)."""
    return Path(os.path.expanduser(os.environ.get(ROOT_ENV, DEFAULT_ROOT))) / key


def archive_path(store: str, key: str) -> tuple[Any, str]:
    fs, root = storage(store)
    return fs, f"{root.rstrip('/')}/compile-cache/{key}.tar.gz"


def local_archive(store: str, key: str) -> Path | None:
    """The archive's path where ``store`` is a filesystem the nodes mount (a path or ``file://``): read and written
    with the standard library (pyarrow is only needed for a bucket, as in Ray's own storage); None for a bucket."""
    if is_uri(store) and not store.startswith("file://"):
        return None
    root = Path(unquote(urlparse(store).path)) if is_uri(store) else Path(store)
    return root / "compile-cache" / f"{key}.tar.gz"


def archive_exists(store: str, key: str) -> bool:
    if (local := local_archive(store, key)) is not None:
        return local.is_file()
    import pyarrow.fs as pafs

    fs, path = archive_path(store, key)
    return fs.get_file_info(path).type == pafs.FileType.File


@contextmanager
def open_archive(store: str, key: str) -> Iterator[BinaryIO]:
    if (local := local_archive(store, key)) is not None:
        with open(local, "rb") as f:
            yield f
        return
    fs, path = archive_path(store, key)
    with fs.open_input_stream(path, compression=None) as f:  # bytes as they are, not by suffix
        yield f


def upload_archive(packed: Path, store: str, key: str) -> None:
    """``packed`` to ``key``'s archive in ``store``, under a temporary name first: readers never see a part."""
    if (local := local_archive(store, key)) is not None:
        local.parent.mkdir(parents=True, exist_ok=True)
        part = local.with_name(f"{local.name}.{uuid.uuid4().hex}.part")
        shutil.copyfile(packed, part)
        os.replace(part, local)
        return
    import pyarrow.fs as pafs

    fs, path = archive_path(store, key)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    part = f"{path}.{uuid.uuid4().hex}.part"
    pafs.copy_files(str(packed), part, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    fs.move(part, path)


@contextmanager
def node_lock(folder: Path) -> Iterator[None]:
    """One replica at a time restores into (or packs) a node's folder; the others wait and then find it done."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f".{folder.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def restore(store: str, key: str, folder: Path) -> bool:
    """Unpack ``key``'s archive from ``store`` into ``folder`` the first time a replica on this node asks;
    return whether anything was unpacked. What the node compiled since is never overwritten."""
    with node_lock(folder):
        if (folder / RESTORED).exists():
            return False
        found = archive_exists(store, key)
        if found:
            # Streamed ("r|gz"): a graph cache of several GiB never sits in memory whole.
            with open_archive(store, key) as f, tarfile.open(fileobj=f, mode="r|gz") as tar:
                tar.extractall(folder, filter="data")
        (folder / RESTORED).write_text(json.dumps({"store": store, "restored": found}))
        return found


def save(store: str, key: str, folder: Path) -> bool:
    """Upload ``folder`` as ``key``'s archive unless storage has one or there is nothing compiled in it; return
    whether it was uploaded. The archive appears under its name only once complete."""
    with node_lock(folder):
        files = [p for p in folder.rglob("*") if p.is_file() and p.name != RESTORED]
        if not files or archive_exists(store, key):
            return False
        # Packed to node-local disk under the lock (the folder holds still), uploaded after it: a replica starting
        # on this node waits for the lock in restore, not for a bucket upload; memory holds neither.
        packed = folder.parent / f".{folder.name}.{uuid.uuid4().hex}.tar.gz"
        with tarfile.open(packed, mode="w:gz") as tar:
            for p in sorted(files):
                tar.add(p, arcname=str(p.relative_to(folder)))
    try:
        upload_archive(packed, store, key)
    finally:
        packed.unlink(missing_ok=True)
    return True
