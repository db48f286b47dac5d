"""gpufleet's catalogue: the pure planner (no Ray, torch or vLLM imports).

config.json -> ``ModelSpec`` (model), GPU table (gpus), memory of training and inference
(memory), vLLM serving memory (serving), parallelism rules, FLOPs, placement as data, and
``plan()`` (planner) returning a typed plan (plans): ``ServePlan``, ``TrainPlan`` or ``InferPlan``.
"""

from gpufleet.catalogue.errors import GpufleetError, PlanError, SpecError
from gpufleet.catalogue.gpus import GPU_TYPES, GpuType, get_gpu
from gpufleet.catalogue.memory import MemoryBreakdown, TrainSetup, estimate, fits
from gpufleet.catalogue.model import ModelSpec, builtin_models, load_model, spec_from_config
from gpufleet.catalogue.placement import Placement
from gpufleet.catalogue.planner import plan, plan_request
from gpufleet.catalogue.plans import InferPlan, Plan, PlanRequest, ServePlan, TrainPlan
from gpufleet.catalogue.serving import ServingMemory, serving_memory

__all__ = [
    "GPU_TYPES", "GpuType", "GpufleetError", "InferPlan", "MemoryBreakdown", "ModelSpec", "Placement", "Plan",
    "PlanError", "PlanRequest", "ServePlan", "ServingMemory", "SpecError", "TrainPlan", "TrainSetup",
    "builtin_models", "estimate", "fits", "get_gpu", "load_model", "plan", "plan_request", "serving_memory",
    "spec_from_config",
]
