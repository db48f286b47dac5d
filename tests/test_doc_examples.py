"""Every `$ gpufleet ...` example in the README and docs/ that needs no cluster shows what the command prints
today (`make docs` rewrites them when an output changes on purpose)."""

import pytest

from gpufleet.doc_examples import examples, run

EXAMPLES = examples()


def test_the_pages_hold_examples_to_check():
    assert len(EXAMPLES) >= 6


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda e: f"{e.page.name}:{e.line + 1}")
def test_a_documented_command_prints_what_its_page_shows(example):
    assert run(example.command) == [line.rstrip() for line in example.shown], (
        f"{example.page.name}:{example.line + 1} is stale: run `make docs`")
