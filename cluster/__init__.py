"""gpufleet's catalogue (pure planning: no Ray, torch or vLLM imports) and cluster edges."""

from cluster.errors import GpufleetError, PlanError, SpecError
from cluster.gpus import GPU_TYPES, GpuType, get_gpu
from cluster.memory import MemoryBreakdown, TrainSetup, estimate, fits
from cluster.planner import Plan, plan
from cluster.serving import ServingMemory, serving_memory
from cluster.spec import ModelSpec, builtin_models, load_model, spec_from_config

__all__ = [
    "GPU_TYPES", "GpuType", "GpufleetError", "MemoryBreakdown", "ModelSpec", "Plan", "PlanError",
    "ServingMemory", "SpecError", "TrainSetup", "builtin_models", "estimate", "fits", "get_gpu",
    "load_model", "plan", "serving_memory", "spec_from_config",
]
