"""The one base class of gpufleet's typed configs, specs and plans."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Config(BaseModel):
    """A validated, immutable record: unknown keys are refused, values never change once built."""

    model_config = ConfigDict(extra="forbid", frozen=True)
