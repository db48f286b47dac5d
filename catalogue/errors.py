"""The error family of the catalogue: one line each, saying what is wrong and how to fix it."""

from __future__ import annotations


class GpufleetError(ValueError):
    """Base of every error gpufleet reports to a user (the CLI prints it as one line)."""


class SpecError(GpufleetError):
    """A model config, job spec or serve spec is invalid."""


class PlanError(GpufleetError):
    """No legal layout exists for the request; the message says what would work."""


def fix(problem: str, remedy: str) -> str:
    """Join a problem statement and its remedy in the house style."""
    return f"{problem.rstrip('.')}. To fix: {remedy}"
