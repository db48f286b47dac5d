"""From a job spec to the layout that runs it, and the DeepSpeed config for that layout.

On GPUs the catalogue's plan decides (workers, ZeRO stage, offload, checkpointing, micro-batch,
dtype); the spec's ``plan:`` section overrides any of it. On CPU workers (no ``gpu:``), the
layout is the overrides with defaults that suit small CPU runs (2 workers, ZeRO-2, float32).
Pure: no Ray, no torch.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from cluster.errors import PlanError, fix
from cluster.gpus import get_gpu
from cluster.memory import ALLGATHER_BUCKET, REDUCE_BUCKET, STAGE3_MAX_LIVE, STAGE3_PREFETCH
from cluster.parallelism import split_batch
from cluster.planner import plan
from cluster.spec import _Frozen, spec_from_config
from jobs.spec import JobSpec

CPU_DEFAULT_WORKERS = 2
CPU_DEFAULT_ZERO = 2


class TrainLayout(_Frozen):
    workers: int = Field(ge=1)
    use_gpu: bool
    accelerator_type: str | None = None
    zero_stage: int = Field(ge=0, le=3)
    offload_optimizer: bool = False
    grad_ckpt: bool = False
    micro_batch: int = Field(ge=1)
    grad_accum: int = Field(ge=1)
    dtype: Literal["bfloat16", "float16", "float32"]
    compile: bool = False
    cpus_per_worker: float = 1.0
    predicted_peak_bytes: int | None = None

    @property
    def global_batch(self) -> int:
        return self.workers * self.micro_batch * self.grad_accum

    def worker_bundles(self) -> list[dict[str, float]]:
        b: dict[str, float] = {"CPU": self.cpus_per_worker}
        if self.use_gpu:
            b["GPU"] = 1.0
            if self.accelerator_type:
                b[f"accelerator_type:{self.accelerator_type}"] = 0.001
        return [dict(b) for _ in range(self.workers)]


def resolve_layout(spec: JobSpec, model_config: dict[str, Any]) -> TrainLayout:
    """The layout for ``spec``: the catalogue's plan on GPUs, overridden by ``spec.plan``."""
    o = spec.plan
    if spec.use_gpu:
        gpu = get_gpu(spec.gpu)
        compiled = True if o.compile is None else o.compile
        p = plan(spec_from_config(model_config, name=spec.model), spec.task, gpu, gpus=o.workers,
                 seq_len=spec.seq_len, batch=spec.global_batch, compile=compiled)
        workers = p.data_parallel
        micro = o.micro_batch or p.micro_batch
        # torch.compile by default on GPUs: +24% tokens/s on an H100 (bench/train); on CPU the
        # compile time outweighs what small runs gain.
        base = dict(zero_stage=p.zero_stage, offload_optimizer=p.offload_optimizer, grad_ckpt=p.grad_ckpt,
                    dtype=p.dtype, compile=p.compile, accelerator_type=gpu.ray_accelerator_type,
                    predicted_peak_bytes=p.peak_bytes_per_gpu)
    else:
        workers = o.workers or CPU_DEFAULT_WORKERS
        micro = o.micro_batch or max(1, spec.global_batch // workers)
        base = dict(zero_stage=CPU_DEFAULT_ZERO, offload_optimizer=False, grad_ckpt=False, dtype="float32",
                    compile=False)
    for key in ("zero_stage", "offload_optimizer", "grad_ckpt", "dtype", "compile"):
        if getattr(o, key) is not None:
            base[key] = getattr(o, key)
    if spec.global_batch % workers:
        raise PlanError(fix(f"global_batch={spec.global_batch} is not divisible by {workers} workers",
                            f"use a global_batch that is a multiple of {workers}"))
    micro, accum = split_batch(spec.global_batch, workers, micro)
    return TrainLayout(workers=workers, use_gpu=spec.use_gpu, micro_batch=micro, grad_accum=accum, **base)


def deepspeed_config(layout: TrainLayout, spec: JobSpec) -> dict[str, Any]:
    """DeepSpeed config for the layout; bucket sizes match the memory model's assumptions."""
    z: dict[str, Any] = {"stage": layout.zero_stage}
    if layout.zero_stage in (1, 2):
        z.update(reduce_bucket_size=REDUCE_BUCKET, allgather_bucket_size=ALLGATHER_BUCKET,
                 overlap_comm=layout.use_gpu, contiguous_gradients=True)
    if layout.zero_stage == 3:
        z.update(reduce_bucket_size=REDUCE_BUCKET, stage3_prefetch_bucket_size=STAGE3_PREFETCH,
                 stage3_max_live_parameters=STAGE3_MAX_LIVE, stage3_param_persistence_threshold=10_000,
                 stage3_gather_16bit_weights_on_model_save=True)
    if layout.offload_optimizer:
        z["offload_optimizer"] = {"device": "cpu", "pin_memory": layout.use_gpu}
    cfg: dict[str, Any] = {
        "train_batch_size": layout.global_batch,
        "train_micro_batch_size_per_gpu": layout.micro_batch,
        "gradient_accumulation_steps": layout.grad_accum,
        "gradient_clipping": spec.grad_clip,
        "zero_optimization": z,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if layout.dtype == "bfloat16":
        cfg["bf16"] = {"enabled": True}
    elif layout.dtype == "float16":  # dynamic loss scaling: fp16 overflows without it
        cfg["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000,
                       "hysteresis": 2, "min_loss_scale": 1}
    if layout.offload_optimizer:  # ZeRO-Offload needs DeepSpeed's CPU Adam
        cfg["optimizer"] = {"type": "AdamW", "params": {"lr": spec.learning_rate, "weight_decay": spec.weight_decay}}
    return cfg
