"""The `$ gpufleet ...` examples of the README and docs/: run, compared with what the page shows, rewritten
by ``python -m gpufleet.doc_examples`` (``make docs``) when outputs change on purpose. An example is a
command line in a fenced block followed by its output; commands that pipe, redirect or show no output
(or need a cluster) are left as prose."""

from __future__ import annotations

import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGES = ("README.md", "docs/*.md")
WIDTH = 100  # the terminal width the pages' tables are drawn at
NEEDS_NO_CLUSTER = ("plan", "estimate", "catalogue")


@dataclass
class Example:
    page: Path
    line: int  # index of the command line in the page
    command: str
    shown: list[str]  # the output lines the page shows


def examples(pages: list[Path] | None = None) -> list[Example]:
    found = []
    for page in pages or [p for pattern in PAGES for p in sorted(ROOT.glob(pattern))]:
        lines = page.read_text().split("\n")
        fenced = False
        for i, line in enumerate(lines):
            if line.startswith("```"):
                fenced = not fenced
                continue
            if not (fenced and line.startswith("$ gpufleet ")):
                continue
            command = line[2:]
            out = []
            for nxt in lines[i + 1:]:
                if nxt.startswith(("$ ", "```")):
                    break
                out.append(nxt)
            args = shlex.split(command, comments=True)
            if out and len(args) > 1 and args[1] in NEEDS_NO_CLUSTER and not {">", "|"} & set(command):
                found.append(Example(page, i, command, out))
    return found


def run(command: str) -> list[str]:
    """What ``command`` prints (stdout and stderr as a terminal shows them), drawn WIDTH columns wide."""
    from click.testing import CliRunner

    from gpufleet import cli

    saved = cli.out.width, cli.err.width
    cli.out.width = cli.err.width = WIDTH
    try:
        result = CliRunner().invoke(cli.main, shlex.split(command, comments=True)[1:])
    finally:
        cli.out.width, cli.err.width = saved
    return [line.rstrip() for line in result.output.rstrip("\n").split("\n")]


def rewrite() -> list[str]:
    """Replace every example's shown output with today's; returns the commands whose output changed."""
    changed = []
    for page in {e.page for e in examples()}:
        lines = page.read_text().split("\n")
        for e in sorted((e for e in examples([page])), key=lambda e: -e.line):  # bottom up: indices stay valid
            now = run(e.command)
            if [s.rstrip() for s in e.shown] != now:
                changed.append(e.command)
            lines[e.line + 1:e.line + 1 + len(e.shown)] = now
        page.write_text("\n".join(lines))
    return changed


if __name__ == "__main__":
    for command in rewrite():
        print(f"updated: {command}", file=sys.stderr)
