"""The job catalogue: every built-in model x task x common GPU type -> the plan's size."""

from __future__ import annotations

from typing import Any

from gpufleet.catalogue.errors import PlanError
from gpufleet.catalogue.gpus import get_gpu
from gpufleet.catalogue.model import builtin_models, load_model
from gpufleet.catalogue.planner import plan
from gpufleet.catalogue.plans import Plan, ServePlan, TrainPlan

CATALOGUE_GPUS = ("H100-80GB", "A100-80GB", "L40S", "A10G")
CATALOGUE_TASKS = ("serve", "lora", "full")


def short(p: Plan) -> str:
    """A catalogue cell: GPU count and the parallelism that matters for the task."""
    if isinstance(p, ServePlan):
        return f"{p.gpus} TP{p.tensor_parallel}" + (f" PP{p.pipeline_parallel}" if p.pipeline_parallel > 1 else "")
    if isinstance(p, TrainPlan):
        return f"{p.gpus} Z{p.zero_stage}" + ("+off" if p.offload_optimizer else "")
    return str(p.gpus)


def cell(p: Plan) -> dict[str, Any]:
    """What the catalogue keeps of one plan."""
    d: dict[str, Any] = dict(short=short(p), gpus=p.gpus, peak_gib=round(p.peak_gib, 1))
    if isinstance(p, ServePlan):
        d.update(tensor_parallel=p.tensor_parallel, pipeline_parallel=p.pipeline_parallel)
    if isinstance(p, TrainPlan):
        d.update(zero_stage=p.zero_stage, offload_optimizer=p.offload_optimizer)
    return d


def build_catalogue(gpus: list[str] | None = None, tasks: tuple[str, ...] = CATALOGUE_TASKS,
                    max_gpus: int = 64) -> list[dict[str, Any]]:
    """One row per built-in model, largest last; each cell is a plan summary or None (no fit)."""
    rows = []
    for name in builtin_models():
        spec = load_model(name)
        cells: dict[str, dict[str, Any]] = {}
        for g in gpus or CATALOGUE_GPUS:
            gpu = get_gpu(g)
            cells[gpu.name] = {}
            for task in tasks:
                try:
                    cells[gpu.name][task] = cell(plan(spec, task, gpu, max_gpus=max_gpus))
                except PlanError:
                    cells[gpu.name][task] = None
        rows.append(dict(model=name, params_b=spec.num_params / 1e9, plans=cells))
    return sorted(rows, key=lambda r: r["params_b"])
