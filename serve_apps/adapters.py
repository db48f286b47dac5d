"""LoRA adapters beside a served model: the table a replica reads, and name -> directory lookup.

A spec names adapters explicitly (``adapters``) and/or a folder whose subfolders are adapters
(``adapters_dir``). The table travels to the replicas in one environment variable.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from catalogue.errors import SpecError, fix
from catalogue.sources import resolve
from serve_apps.spec import ModelEntry

ADAPTERS_ENV = "GPUFLEET_LORA_ADAPTERS"  # JSON: {"adapters": {name: dir}, "adapters_dir": dir | null}


def adapters_table(entry: ModelEntry, base: Path) -> dict[str, Any] | None:
    """The entry's adapters (checked now) and adapters folder, or None without LoRA."""
    if not entry.adapters and not entry.adapters_dir:
        return None
    out = {}
    for name, d in entry.adapters.items():
        p = resolve(base, d)
        if not (p / "adapter_config.json").is_file():
            raise SpecError(fix(f"models[{entry.id}].adapters.{name}: {p} has no adapter_config.json",
                                "point it at a LoRA directory written by `gpufleet train` (output_dir/final)"))
        out[name] = str(p)
    folder = str(resolve(base, entry.adapters_dir)) if entry.adapters_dir else None
    return {"adapters": out, "adapters_dir": folder}


def find_adapter(table: dict, name: str) -> str | None:
    """The directory of adapter ``name`` in an adapters table, or None."""
    if name in table.get("adapters", {}):
        return table["adapters"][name]
    root = table.get("adapters_dir")
    if root and name and "/" not in name and (Path(root) / name / "adapter_config.json").is_file():
        return str(Path(root) / name)
    return None


def list_adapters(table: dict) -> list[str]:
    names = set(table.get("adapters", {}))
    root = table.get("adapters_dir")
    if root and Path(root).is_dir():
        names |= {p.parent.name for p in Path(root).glob("*/adapter_config.json")}
    return sorted(names)
