"""The house's layers: each package imports only the ones below it.

Source folders install as one namespace (``catalogue/`` is ``gpufleet.catalogue``); ``gpufleet`` alone
is the CLI's own folder.

    gpufleet (CLI, render, demo)
    jobs | serve_apps (siblings: training and serving, never importing each other)
    cluster (Ray operations: head, status, monitor, launcher, placement; the adapter store both paths share)
    catalogue (the pure planner)
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
MAY_IMPORT = {
    "catalogue": {"catalogue"},
    "cluster": {"catalogue", "cluster"},
    "jobs": {"catalogue", "cluster", "jobs"},
    "serve_apps": {"catalogue", "cluster", "serve_apps"},
    "gpufleet": set(),  # the top: anything
}


def project_imports(path: Path) -> set[str]:
    """Top-level project packages a module imports (at any depth of the file)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
            [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else [])
        found |= {layer for n in names if (layer := layer_of(n))}
    return found


def layer_of(module: str) -> str | None:
    """The project package a module name belongs to (``gpufleet.jobs.spec`` -> jobs), None outside it."""
    parts = module.split(".")
    if parts[0] != "gpufleet":
        return None
    return parts[1] if len(parts) > 1 and parts[1] in MAY_IMPORT else "gpufleet"


@pytest.mark.parametrize("package", [p for p in MAY_IMPORT if p != "gpufleet"])
def test_package_imports_only_downward(package):
    upward = {str(f.relative_to(ROOT)): sorted(project_imports(f) - MAY_IMPORT[package])
              for f in sorted((ROOT / package).rglob("*.py"))}
    assert {f: up for f, up in upward.items() if up} == {}
