"""From a job spec to the layout that runs it, and the DeepSpeed config for that layout.

On GPUs the catalogue's plan decides (workers and their placement, ZeRO stage, offload,
checkpointing, micro-batch, dtype); the spec's ``plan:`` section pins any of it. On CPU
workers (no ``gpu:``), the layout is the overrides with defaults that suit small CPU runs
(2 workers, ZeRO-2, float32). Pure: no Ray, no torch.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from gpufleet.catalogue.config import Config
from gpufleet.catalogue.errors import SpecError, fix
from gpufleet.catalogue.memory import ALLGATHER_BUCKET, REDUCE_BUCKET, STAGE3_MAX_LIVE, STAGE3_PREFETCH
from gpufleet.catalogue.model import ModelSpec
from gpufleet.catalogue.parallelism import split_batch
from gpufleet.catalogue.placement import Placement, worker_bundles
from gpufleet.catalogue.planner import plan
from gpufleet.catalogue.plans import layout_pins
from gpufleet.jobs.spec import JobSpec

CPU_DEFAULT_WORKERS = 2
CPU_DEFAULT_ZERO = 2
CPUS_PER_CPU_WORKER = 1.0


class TrainLayout(Config):
    """How one job runs: the placement Ray reserves for its workers and DeepSpeed's settings."""

    placement: Placement = Field(description="One bundle per worker; Ray Train's ScalingConfig is built from it.")
    zero_stage: int = Field(ge=0, le=3)
    offload_optimizer: bool = False
    offload_params: bool = False
    grad_ckpt: bool = False
    micro_batch: int = Field(ge=1)
    grad_accum: int = Field(ge=1)
    dtype: Literal["bfloat16", "float16", "float32"]
    compile: bool = False
    predicted_peak_bytes: int | None = None

    @property
    def workers(self) -> int:
        return len(self.placement.bundles)

    @property
    def use_gpu(self) -> bool:
        return self.placement.use_gpu

    @property
    def global_batch(self) -> int:
        return self.workers * self.micro_batch * self.grad_accum


def resolve_layout(spec: JobSpec, model: ModelSpec) -> TrainLayout:
    """The layout for ``spec``: on GPUs the catalogue's plan with ``spec.plan``'s settings pinned."""
    o = spec.plan
    if spec.use_gpu:
        # The overrides pin the plan's search, so what is placed (host memory included) is a layout the
        # memory model checked, and one that cannot fit is refused here. torch.compile is the planner's
        # GPU default (+24% tokens/s on an H100, bench/train).
        p = plan(model, spec.task, spec.gpu, gpus=o.workers, seq_len=spec.seq_len, global_batch=spec.global_batch,
                 dtype=o.dtype or "auto", objective=o.objective, **layout_pins(o), **({} if o.compile is None else {"compile": o.compile}))
        placement, micro = p.placement, p.micro_batch
        base: dict[str, Any] = dict(zero_stage=p.zero_stage, offload_optimizer=p.offload_optimizer,
                                    offload_params=p.offload_params, grad_ckpt=p.grad_ckpt, dtype=p.dtype,
                                    compile=p.compile, predicted_peak_bytes=p.peak_bytes_per_gpu)
    else:
        # On CPU the compile time outweighs what small runs gain.
        workers = o.workers or CPU_DEFAULT_WORKERS
        model.check_context(spec.seq_len)
        placement = Placement(bundles=worker_bundles(workers, 0, CPUS_PER_CPU_WORKER, None), strategy="PACK")
        micro = o.micro_batch or max(1, spec.global_batch // workers)
        # qlora: no ZeRO partitioning of a quantized base (DeepSpeed would try to shard its uint8 weights)
        base = dict(zero_stage=0 if spec.task == "qlora" else CPU_DEFAULT_ZERO, dtype="float32",
                    grad_ckpt=spec.task == "qlora")
        for key in ("zero_stage", "offload_optimizer", "offload_params", "grad_ckpt", "dtype", "compile"):
            if getattr(o, key) is not None:
                base[key] = getattr(o, key)
        if base.get("offload_params") and base["zero_stage"] != 3:  # on GPUs the plan refuses it
            raise SpecError(fix(f"plan.offload_params needs ZeRO stage 3, not {base['zero_stage']}",
                                "set plan.zero_stage: 3 or drop plan.offload_params"))
    micro, accum = split_batch(spec.global_batch, len(placement.bundles), micro)
    return TrainLayout(placement=placement, micro_batch=micro, grad_accum=accum, **base)


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
    if layout.offload_params:  # ZeRO-3 only (the spec refuses it elsewhere)
        z["offload_param"] = {"device": "cpu", "pin_memory": layout.use_gpu}
    cfg: dict[str, Any] = {
        "train_batch_size": layout.global_batch,
        "train_micro_batch_size_per_gpu": layout.micro_batch,
        "gradient_accumulation_steps": layout.grad_accum,
        "gradient_clipping": spec.grad_clip,
        "zero_optimization": z,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if spec.task == "qlora":
        pass  # the model keeps its own dtypes (nf4 base, half-precision compute, fp32 rest): casting it is refused
    elif layout.dtype == "bfloat16":
        cfg["bf16"] = {"enabled": True}
    elif layout.dtype == "float16":  # dynamic loss scaling: fp16 overflows without it
        cfg["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000,
                       "hysteresis": 2, "min_loss_scale": 1}
    if layout.offload_optimizer:  # ZeRO-Offload needs DeepSpeed's CPU Adam
        cfg["optimizer"] = {"type": "AdamW", "params": {"lr": spec.learning_rate, "weight_decay": spec.weight_decay}}
    return cfg
