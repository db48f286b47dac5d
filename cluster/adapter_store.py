"""The adapter store training publishes to and serving reads from: the folder a serve spec names as ``adapters_dir``.

``<store>/<name>`` gets the adapter's files and ``gpufleet-adapter.json``, which names the adapter's version (the
sha256 of its weights); replicas serving the store compare that version and load a re-published adapter in place
on its next request. A local store swaps a symlink, so a replica never reads half an adapter; in a bucket the
version file is written last, so a replica switches only once the weights are complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from gpufleet.catalogue.sources import is_uri

VERSION_FILE = "gpufleet-adapter.json"
WEIGHTS = "adapter_model.safetensors"


def storage(uri: str) -> tuple[Any, str]:
    """pyarrow's filesystem and path for a storage URI (s3://, gs://, file://)."""
    import pyarrow.fs as pafs

    return pafs.FileSystem.from_uri(uri.rstrip("/"))


def _read(location: str, name: str) -> bytes:
    if not is_uri(location):
        return (Path(location) / name).read_bytes()
    fs, path = storage(location)
    with fs.open_input_stream(f"{path}/{name}") as f:
        return f.read()


def publish_adapter(adapter: str, store: str, name: str) -> dict[str, Any]:
    """Copy ``adapter`` (a directory or storage URI) to ``<store>/<name>`` with its version file; return the
    version record."""
    weights = _read(adapter, WEIGHTS)
    record = {"name": name, "version": hashlib.sha256(weights).hexdigest()[:16], "source": adapter,
              "published_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if is_uri(store):
        import pyarrow.fs as pafs

        fs, root = storage(store)
        target = f"{root.rstrip('/')}/{name}"
        src_fs, src = (pafs.LocalFileSystem(), str(Path(adapter).resolve())) if not is_uri(adapter) else storage(adapter)
        fs.create_dir(target, recursive=True)
        pafs.copy_files(src, target, source_filesystem=src_fs, destination_filesystem=fs)
        with fs.open_output_stream(f"{target}/{VERSION_FILE}") as f:  # last: the switch
            f.write(json.dumps(record).encode())
        return record
    root = Path(store)
    versions = root / ".versions"
    versions.mkdir(parents=True, exist_ok=True)
    built = versions / f"{name}-{record['version']}"
    if not built.exists():
        part = versions / f".{built.name}.{os.getpid()}.part"
        if is_uri(adapter):
            import pyarrow.fs as pafs

            fs, src = storage(adapter)
            part.mkdir(parents=True)
            pafs.copy_files(src, str(part), source_filesystem=fs)
        else:
            shutil.copytree(adapter, part)
        (part / VERSION_FILE).write_text(json.dumps(record))
        part.rename(built)
    link = root / name
    if link.exists() and not link.is_symlink():  # an adapter copied in by hand: kept beside the versions
        link.rename(versions / f"{name}-unversioned-{int(time.time())}")
    tmp = root / f".{name}.{os.getpid()}.link"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(built.relative_to(root))
    os.replace(tmp, link)  # atomic: a replica sees the old adapter or the new one
    return record


def adapter_version(location: str) -> str | None:
    """The version a published adapter's version file names; else its weights' size and modification time
    (an adapter copied in by hand), or None where it has no weights."""
    try:
        return json.loads(_read(location, VERSION_FILE))["version"]
    except (OSError, FileNotFoundError, KeyError, ValueError):
        pass
    if not is_uri(location):
        try:
            st = (Path(location) / WEIGHTS).stat()
        except OSError:
            return None
        return f"{st.st_size}-{st.st_mtime_ns}"
    import pyarrow.fs as pafs

    fs, path = storage(location)
    info = fs.get_file_info(f"{path}/{WEIGHTS}")
    return None if info.type != pafs.FileType.File else f"{info.size}-{info.mtime_ns}"
