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
