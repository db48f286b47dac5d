"""The generated reference is what the code generates today, and every spec field is described."""

from pathlib import Path

import pytest

from gpufleet.jobs.spec import JobSpec
from gpufleet.reference import _models, pages
from gpufleet.serve_apps.spec import ServeSpec

REFERENCE = Path(__file__).parents[1] / "docs" / "reference"


@pytest.mark.parametrize("name", sorted(pages()))
def test_the_committed_reference_page_is_current(name):
    assert (REFERENCE / name).read_text() == pages()[name], f"docs/reference/{name} is stale: run `make docs`"


@pytest.mark.parametrize("spec", [JobSpec, ServeSpec])
def test_every_spec_field_has_a_description(spec):
    assert {m.__name__: [f for f, i in m.model_fields.items() if not i.description] for m in _models(spec)} == {
        m.__name__: [] for m in _models(spec)}


def test_every_gpufleet_environment_variable_the_code_reads_is_on_the_environment_page():
    import re

    root = Path(__file__).parents[1]
    used = {m for d in ("catalogue", "cluster", "jobs", "serve_apps", "gpufleet") for f in (root / d).rglob("*.py")
            for m in re.findall(r"\bGPUFLEET_[A-Z_]+\b", f.read_text())}
    page = (REFERENCE / "environment.md").read_text()
    assert used and {v for v in used if f"`{v}`" not in page} == set()


def test_every_relative_link_of_the_readme_and_docs_points_at_a_file_that_exists():
    import re

    root = Path(__file__).parents[1]
    broken = []
    for page in [root / "README.md", *sorted((root / "docs").rglob("*.md"))]:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            path = target.split("#")[0]
            if path and "://" not in path and not (page.parent / path).exists():
                broken.append(f"{page.relative_to(root)} -> {target}")
    assert broken == []
