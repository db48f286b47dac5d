"""gpufleet training jobs: a validated job spec, its layout from the plan, and the Ray Train + DeepSpeed run."""

from gpufleet.jobs.finetune import prepare, run
from gpufleet.jobs.layout import TrainLayout, deepspeed_config, resolve_layout
from gpufleet.jobs.spec import JobSpec, load_job_spec

__all__ = ["JobSpec", "TrainLayout", "deepspeed_config", "load_job_spec", "prepare", "resolve_layout", "run"]
