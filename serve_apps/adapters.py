"""LoRA adapters beside a served model: the table a replica reads, and name -> directory lookup.

A spec names adapters explicitly (``adapters``) and/or a folder whose subfolders are adapters
(``adapters_dir``): a local or shared path, or a storage URI (``s3://``, ``gs://``, ``file://``; read
through pyarrow's filesystems, as `gpufleet train` writes results there), whose adapters a replica
copies to its own disk when first asked for. The table travels to the replicas in one environment
variable.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from gpufleet.catalogue.errors import SpecError, fix
from gpufleet.catalogue.sources import is_uri, resolve
from gpufleet.cluster.adapter_store import storage
from gpufleet.serve_apps.spec import ModelEntry

ADAPTERS_ENV = "GPUFLEET_LORA_ADAPTERS"  # JSON: {"adapters": {name: dir}, "adapters_dir": dir | null}


def adapters_table(entry: ModelEntry, base: Path) -> dict[str, Any] | None:
    """The entry's adapters (checked now) and adapters folder, or None without LoRA."""
    if not entry.adapters and not entry.adapters_dir:
        return None
    out = {}
    for name, d in entry.adapters.items():
        p = d.rstrip("/") if is_uri(d) else str(resolve(base, d))
        if not _is_adapter(p):
            raise SpecError(fix(f"models[{entry.id}].adapters.{name}: {p} has no adapter_config.json",
                                "point it at a LoRA directory written by `gpufleet train` (<output_dir or "
                                "storage>/<name>/final)"))
        out[name] = p
    folder = entry.adapters_dir
    if folder and not is_uri(folder):
        folder = str(resolve(base, folder))
    return {"adapters": out, "adapters_dir": folder}


def _is_adapter(location: str) -> bool:
    """Whether a directory or storage URI holds a LoRA adapter."""
    if not is_uri(location):
        return (Path(location) / "adapter_config.json").is_file()
    import pyarrow.fs as pafs

    fs, path = storage(location)
    return fs.get_file_info(f"{path}/adapter_config.json").type == pafs.FileType.File


def _child(root: str, name: str) -> str:
    return f"{root.rstrip('/')}/{name}" if is_uri(root) else str(Path(root) / name)


def find_adapter(table: dict, name: str) -> str | None:
    """The directory (or storage URI) of adapter ``name`` in an adapters table, or None."""
    if name in table.get("adapters", {}):
        return table["adapters"][name]
    root = table.get("adapters_dir")
    if root and name and "/" not in name and _is_adapter(found := _child(root, name)):
        return found
    return None


def list_adapters(table: dict) -> list[str]:
    names = set(table.get("adapters", {}))
    root = table.get("adapters_dir")
    if root and is_uri(root):
        import pyarrow.fs as pafs

        fs, path = storage(root)
        folders = [f for f in fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
                   if f.type == pafs.FileType.Directory]
        configs = fs.get_file_info([f"{f.path}/adapter_config.json" for f in folders])  # one call for all
        names |= {f.base_name for f, c in zip(folders, configs, strict=True) if c.type == pafs.FileType.File}
    elif root and Path(root).is_dir():
        names |= {p.parent.name for p in Path(root).glob("*/adapter_config.json")}
    return sorted(names)


def local_copy(adapter: str, cache: Path | None = None, version: str | None = None) -> str:
    """A local directory holding ``adapter``: the directory itself, or a copy of a storage URI's
    files (made once per replica and version; vLLM loads adapters from local disk)."""
    if not is_uri(adapter):
        return adapter
    import pyarrow.fs as pafs

    fs, path = storage(adapter)
    local = (cache or Path(tempfile.gettempdir()) / "gpufleet-adapters") / (
        path.strip("/").replace("/", "--") + (f"@{version}" if version else ""))
    if not (local / "adapter_config.json").is_file():
        # copied aside, then renamed: replicas sharing a disk never load a half-copied adapter
        part = local.with_name(f"{local.name}.{os.getpid()}.part")
        part.mkdir(parents=True, exist_ok=True)
        pafs.copy_files(path, str(part), source_filesystem=fs)
        try:
            part.rename(local)
        except OSError:  # another replica finished first
            shutil.rmtree(part, ignore_errors=True)
    return str(local)
