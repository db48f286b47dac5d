"""plan(): the cheapest legal layout for running a model on a GPU type.

Pure data in, data out: no Ray, no torch, no environment reads. Placement turns the
plan's bundles into a Ray placement group elsewhere (``cluster.placement``).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Literal

from pydantic import Field

from cluster.errors import PlanError, fix
from cluster.gpus import GpuType
from cluster.memory import CUDA_CONTEXT, DEFAULT_HEADROOM, GIB, MemoryBreakdown, TrainSetup, estimate, fits
from cluster.parallelism import check_tp, legal_tp_sizes, split_batch
from cluster.serving import ServingMemory, serving_memory
from cluster.spec import ModelSpec, _Frozen

PlanTask = Literal["serve", "infer", "lora", "full"]
TASKS: tuple[str, ...] = ("serve", "infer", "lora", "full")
DEFAULT_SEQ = {"serve": 8192, "infer": 2048, "lora": 2048, "full": 2048}
DEFAULT_GLOBAL_BATCH = 16
CPUS_PER_GPU = 4


class Plan(_Frozen):
    """A layout for one model, task and GPU type: data you can print, diff and place."""

    model: str
    task: PlanTask
    gpu: str
    accelerator_type: str
    gpus: int = Field(ge=1, description="GPUs per replica (serve) or per job.")
    gpus_per_node: int = Field(ge=1)
    nodes: int = Field(ge=1)
    dtype: Literal["bfloat16", "float16"]
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    data_parallel: int = 1
    zero_stage: int | None = None
    offload_optimizer: bool = False
    offload_params: bool = False
    grad_ckpt: bool = False
    compile: bool = Field(default=False, description="Training runs the model under torch.compile.")
    seq_len: int
    micro_batch: int = 1
    grad_accum: int = 1
    global_batch: int | None = None
    headroom: float
    peak_bytes_per_gpu: int = Field(description="Predicted peak per GPU, CUDA context included.")
    gpu_bytes: int
    memory: MemoryBreakdown | None = None
    serving: ServingMemory | None = None
    notes: tuple[str, ...] = ()

    @property
    def peak_gib(self) -> float:
        return self.peak_bytes_per_gpu / GIB

    @property
    def placement_strategy(self) -> str:
        """STRICT_PACK keeps a tensor-parallel group in one node; data-parallel workers PACK."""
        return "STRICT_PACK" if self.tensor_parallel > 1 and self.pipeline_parallel == 1 else "PACK"

    @property
    def bundles(self) -> list[dict[str, float]]:
        """One Ray bundle per GPU, pinned to the GPU type by its accelerator_type resource."""
        return [{"GPU": 1.0, f"accelerator_type:{self.accelerator_type}": 0.001, "CPU": float(CPUS_PER_GPU)}
                for _ in range(self.gpus)]

    def summary(self) -> str:
        par = f"TP={self.tensor_parallel}" + (f" PP={self.pipeline_parallel}" if self.pipeline_parallel > 1 else "")
        if self.task in ("lora", "full"):
            par = f"DP={self.data_parallel} ZeRO-{self.zero_stage}" + (
                " +offload" if self.offload_optimizer else "") + (" +ckpt" if self.grad_ckpt else "")
        return (f"{self.model} {self.task} on {self.gpus} x {self.gpu} ({par}), "
                f"{self.peak_gib:.1f} of {self.gpu_bytes / GIB:.0f} GiB per GPU")

    def to_dict(self) -> dict[str, Any]:
        """Stable, diffable form: defaults and empty sections left out, bundles included."""
        d = self.model_dump(exclude_defaults=True, exclude_none=True)
        d["placement_strategy"] = self.placement_strategy
        d["bundles"] = self.bundles
        if self.memory:
            d["memory_gib"] = self.memory.as_gib()
            d.pop("memory", None)
        return d


def plan(spec: ModelSpec, task: str, gpu: GpuType, gpus: int | None = None, gpus_per_node: int = 8,
         seq_len: int | None = None, batch: int | None = None, headroom: float = DEFAULT_HEADROOM,
         max_gpus: int | None = None, compile: bool = True) -> Plan:
    """The cheapest legal layout (fewest GPUs) for ``spec`` doing ``task`` on ``gpu``.

    ``gpus`` pins the GPU count; ``max_gpus`` is the inventory; ``batch`` is the global batch for
    training and the concurrent sequences wanted for serving; ``seq_len`` the tokens per sequence;
    ``compile`` whether training runs under torch.compile (it changes the activation memory).
    """
    if task not in TASKS:
        raise PlanError(fix(f"unknown task {task!r}", f"use one of: {', '.join(TASKS)}"))
    for field, value in (("gpus", gpus), ("gpus_per_node", gpus_per_node), ("seq_len", seq_len),
                         ("batch", batch), ("max_gpus", max_gpus)):
        if value is not None and value < 1:
            raise PlanError(fix(f"{field}={value} must be a positive integer", f"pass {field} >= 1"))
    if not 0 <= headroom < 1:
        raise PlanError(fix(f"headroom={headroom} must be in [0, 1)", "pass e.g. 0.1 for 10%"))
    seq = seq_len or min(DEFAULT_SEQ[task], spec.max_position_embeddings)
    limit = gpus or max_gpus or 1024
    ctx = dict(spec=spec, gpu=gpu, gpus_per_node=gpus_per_node, seq=seq, headroom=headroom)
    finder = {"serve": _plan_serve, "infer": _plan_infer}.get(task, functools.partial(_plan_train, compile=compile))
    found = finder(task=task, batch=batch, counts=_counts(gpus, limit), **ctx)
    if found is not None:
        return found
    raise PlanError(_explain_failure(task, batch, gpus, limit, finder, ctx))


def _counts(gpus: int | None, limit: int) -> list[int]:
    if gpus:
        return [gpus]
    out, n = [], 1
    while n <= limit:
        out.append(n)
        n *= 2
    if out[-1] != limit:
        out.append(limit)
    return out


def _explain_failure(task: str, batch: int | None, gpus: int | None, limit: int, finder, ctx: dict) -> str:
    spec, gpu = ctx["spec"], ctx["gpu"]
    weights = spec.num_params * 2
    asked = f"{gpus} x {gpu.name}" if gpus else f"up to {limit} x {gpu.name}"
    alt = finder(task=task, batch=batch, counts=_counts(None, 4096), **ctx)
    if alt is not None:
        remedy = f"use {alt.summary()}"
    else:
        remedy = "choose a GPU type with more memory, a shorter sequence or a smaller batch"
    return fix(f"{spec.name} ({task}, {ctx['seq']} tokens) does not fit on {asked}: "
               f"{weights / GIB:.0f} GiB of half-precision weights", remedy)


# ---- serve ---------------------------------------------------------------------------------------
def _plan_serve(spec, gpu, gpus_per_node, seq, headroom, task, batch, counts) -> Plan | None:
    want = batch or 1
    util = round(1 - headroom, 4)
    legal = legal_tp_sizes(spec, gpus_per_node)
    for n in counts:
        layouts = []
        if n <= gpus_per_node and n in legal:
            layouts.append((n, 1))
        elif n > gpus_per_node and n % gpus_per_node == 0 and gpus_per_node in legal:
            layouts.append((gpus_per_node, n // gpus_per_node))
        for tp, pp in layouts:
            if pp > spec.num_layers:
                continue
            mem = serving_memory(spec, gpu, tp=tp, pp=pp, context=seq, gpu_memory_utilization=util)
            if mem.concurrent_seqs >= want:
                return _make(spec, "serve", gpu, tp * pp, gpus_per_node, seq, headroom, tensor_parallel=tp,
                             pipeline_parallel=pp, serving=mem, peak_bytes_per_gpu=mem.peak,
                             notes=_serve_notes(spec, mem))
    if len(counts) == 1:  # pinned count: say why its layout is illegal rather than "does not fit"
        n = counts[0]
        if n <= gpus_per_node:
            check_tp(spec, n, gpus_per_node)
        elif n % gpus_per_node:
            raise PlanError(fix(f"{n} GPUs are not a whole number of {gpus_per_node}-GPU nodes",
                                f"pin a multiple of {gpus_per_node}, or one of {legal}"))
        elif gpus_per_node not in legal:
            raise PlanError(fix(
                f"{n} GPUs over {gpus_per_node}-GPU nodes need tensor_parallel_size={gpus_per_node}, which does not "
                f"split {spec.name}'s {spec.num_heads} attention heads / {spec.num_kv_heads} KV heads evenly",
                f"pin one of {legal}"))
    return None


def _serve_notes(spec: ModelSpec, mem: ServingMemory) -> tuple[str, ...]:
    notes = [f"KV cache {mem.kv_cache / GIB:.1f} GiB/GPU = {mem.kv_tokens} tokens; "
             f"{mem.concurrent_seqs} sequences of {mem.context} tokens at once"]
    if spec.sliding_layers:
        notes.append(f"{len(spec.sliding_layers)} of {spec.num_layers} layers keep only a "
                     f"{spec.sliding_window}-token window")
    return tuple(notes)


# ---- infer (transformers, device_map across GPUs) -------------------------------------------------
def _plan_infer(spec, gpu, gpus_per_node, seq, headroom, task, batch, counts) -> Plan | None:
    mem = estimate(spec, TrainSetup(task="infer", micro_batch=batch or 1, seq_len=seq))
    for n in counts:
        # device_map splits layers, so each GPU holds ~1/n of the weights; the logits live on the last.
        per_gpu = mem.weights // n + mem.logits_and_loss
        if fits(per_gpu, gpu.memory_bytes, headroom):
            return _make(spec, "infer", gpu, n, gpus_per_node, seq, headroom, pipeline_parallel=n,
                         micro_batch=batch or 1, memory=mem, peak_bytes_per_gpu=per_gpu + CUDA_CONTEXT,
                         notes=("device_map='auto' splits the layers over the GPUs",) if n > 1 else ())
    return None


# ---- lora / full (DeepSpeed ZeRO) ---------------------------------------------------------------
# Preference order inside one GPU count: faster layouts first.
_TRAIN_OPTIONS = [  # (zero_stage, grad_ckpt, offload_optimizer, offload_params)
    (0, False, False, False), (1, False, False, False), (2, False, False, False), (3, False, False, False),
    (0, True, False, False), (1, True, False, False), (2, True, False, False), (3, True, False, False),
    (2, True, True, False), (3, True, True, False), (3, True, True, True),
]


def _plan_train(spec, gpu, gpus_per_node, seq, headroom, task, batch, counts, compile) -> Plan | None:
    global_batch = batch or DEFAULT_GLOBAL_BATCH
    for n in counts:
        if global_batch % n:
            continue
        for stage, ckpt, off_opt, off_par in _TRAIN_OPTIONS:
            if n == 1 and stage in (1, 2) and not off_opt:
                continue  # nothing to partition on one GPU
            if n > 1 and stage == 0:
                continue
            for micro in _micro_batches(global_batch // n):
                micro_b, accum = split_batch(global_batch, n, micro)
                setup = TrainSetup(task=task, precision="bf16" if gpu.supports_bf16 else "fp16",
                                   micro_batch=micro_b, grad_accum=accum, seq_len=seq, grad_ckpt=ckpt,
                                   engine="deepspeed", compile=compile, data_parallel=n, zero_stage=stage,
                                   offload_optimizer=off_opt, offload_params=off_par)
                mem = estimate(spec, setup)
                if fits(mem.peak, gpu.memory_bytes, headroom):
                    return _make(spec, task, gpu, n, gpus_per_node, seq, headroom, data_parallel=n,
                                 zero_stage=stage, grad_ckpt=ckpt, compile=compile, offload_optimizer=off_opt,
                                 offload_params=off_par, micro_batch=micro_b, grad_accum=accum,
                                 global_batch=global_batch, memory=mem,
                                 peak_bytes_per_gpu=mem.peak + CUDA_CONTEXT,
                                 notes=_train_notes(mem, off_opt))
    return None


def _micro_batches(per_rank: int) -> list[int]:
    """Micro-batch sizes dividing the per-rank share, largest first (capped at 64)."""
    return [m for m in range(min(per_rank, 64), 0, -1) if per_rank % m == 0]


def _train_notes(mem: MemoryBreakdown, offload: bool) -> tuple[str, ...]:
    notes = [f"peak at {mem.peak_phase}"]
    if offload:
        notes.append(f"{mem.cpu_offload / GIB:.0f} GiB of optimizer state per GPU lives in host memory")
    return tuple(notes)


def _make(spec: ModelSpec, task: str, gpu: GpuType, n: int, gpus_per_node: int, seq: int, headroom: float,
          **fields: Any) -> Plan:
    return Plan(model=spec.name, task=task, gpu=gpu.name, accelerator_type=gpu.ray_accelerator_type, gpus=n,
                gpus_per_node=min(gpus_per_node, n), nodes=math.ceil(n / gpus_per_node), dtype=gpu.train_dtype,
                seq_len=seq, headroom=headroom, gpu_bytes=gpu.memory_bytes, **fields)
