"""vLLM serving memory: weights per TP rank, the profiled activation peak, and the KV cache.

vLLM (V1) sizes its KV cache as ``gpu_memory_utilization x GPU memory - weights - torch peak
increase of a profiling run - non-torch increase during it``, each increase measured from the
process's own start: the CUDA context it already holds and the CUDA graphs it captures after
sizing the cache sit outside that budget (they add to the GPU's use, not to the cache's). This
module mirrors that arithmetic so the plan can say how many tokens of cache fit, the largest
``max_model_len``, and how many sequences of a given length run at once. Checked against vLLM
0.26 on an H100 (bench/serve/results/h100-kv-capacity.json).
"""

from __future__ import annotations

from pydantic import Field

from gpufleet.catalogue.config import Config
from gpufleet.catalogue.gpus import GIB, GpuType
from gpufleet.catalogue.memory import CUDA_CONTEXT
from gpufleet.catalogue.model import DTYPE_BYTES, ModelSpec
from gpufleet.catalogue.parallelism import kv_heads_per_rank

BLOCK_SIZE = 16  # vLLM's default KV block (tokens)
# Gemma 2's profiling peak holds more than the MLP term (its four norms per layer, soft-capped attention):
# 6 more hidden-sized copies per token, fitted after measuring gemma-2-2b/9b/27b on an H100 (vLLM 0.26
# reported 1.17 / 1.82 / 2.34 GiB; without it the plan was 0.9-1.6% optimistic on their KV tokens).
GEMMA2_EXTRA_HIDDEN = 6
DEFAULT_UTILIZATION = 0.90
DEFAULT_MAX_BATCHED_TOKENS = 8192
DEFAULT_MAX_NUM_SEQS = 256  # vLLM's default batch cap: a replica never runs more sequences at once
DEFAULT_EXPECTED_TOKENS = 2048  # prompt + output of a typical chat request, when the spec does not say
CUDA_GRAPHS = int(0.5 * GIB)  # captured after the cache is sized (0.44-0.86 GiB measured on an H100)
FORWARD_NON_TORCH = int(0.22 * GIB)  # non-torch memory a profiling forward adds (measured, vLLM 0.26, H100)
NCCL_PER_RANK = int(0.25 * GIB)


class ServingMemory(Config):
    """Per-GPU memory of one vLLM replica (one TP rank of one pipeline stage)."""

    tensor_parallel: int = Field(ge=1)
    pipeline_parallel: int = Field(ge=1)
    gpu_memory_utilization: float = Field(gt=0, le=1)
    weights: int
    activation_peak: int
    non_torch: int = Field(description="Non-torch memory the profiling run adds (NCCL buffers under TP/PP).")
    outside_budget: int = Field(default=0, description=(
        "CUDA context and CUDA graphs: held by the replica but outside gpu_memory_utilization's budget."))
    kv_cache: int = Field(description="Bytes left for the KV cache on each GPU (<= 0: does not fit).")
    kv_bytes_per_token: int = Field(description="KV bytes per token on each GPU, all of its layers.")
    kv_tokens: int = Field(description="Tokens of KV cache as vLLM reports them (its hybrid layout for sliding-window layers).")
    max_model_len: int = Field(description="Longest sequence one replica can hold (0: none).")
    concurrent_seqs: int = Field(description="Sequences of the requested context that fit at once.")
    context: int
    max_num_seqs: int = Field(default=DEFAULT_MAX_NUM_SEQS, description="vLLM's batch cap the memory was profiled for.")
    max_num_batched_tokens: int = Field(default=DEFAULT_MAX_BATCHED_TOKENS,
                                        description="Tokens of vLLM's profiling forward (its prefill chunk).")
    expected_tokens: int = Field(default=0, description="Prompt + output tokens of a typical request.")
    concurrent_at_expected: int = Field(default=0, description="Requests of the expected length that fit at once.")

    @property
    def peak(self) -> int:
        return self.weights + self.activation_peak + self.non_torch + max(self.kv_cache, 0) + self.outside_budget


def kv_bytes_per_token_layer(spec: ModelSpec, tp: int, dtype_bytes: int) -> int:
    """K and V of one token in one layer on one TP rank: 2 x KV heads x head_dim x dtype."""
    return 2 * kv_heads_per_rank(spec, tp) * spec.head_dim * dtype_bytes


def kv_groups(spec: ModelSpec, pp: int = 1) -> tuple[int, int, int]:
    """``(layers per group, full-attention groups, sliding-window groups)`` of one pipeline stage, as vLLM's
    hybrid KV-cache manager lays them out (vllm/v1/core/kv_cache_utils.py): layers are bucketed by attention
    type, the group size is the smaller bucket (the larger where it is under 1.5x the smaller), each bucket is
    split into groups of that size, the last padded; one block id takes a page in every layer of its group."""
    sliding = -(-len(spec.sliding_layers) // pp)
    full = -(-(spec.num_layers - len(spec.sliding_layers)) // pp)
    counts = [n for n in (full, sliding) if n]
    size = min(counts)
    if max(counts) < 1.5 * size:
        size = max(counts)
    return size, -(-full // size), -(-sliding // size)


def _blocks(tokens: int) -> int:
    return -(-tokens // BLOCK_SIZE)


def kv_bytes_for_sequence(spec: ModelSpec, context: int, tp: int, pp: int, dtype_bytes: int) -> int:
    """KV bytes one sequence of ``context`` tokens holds on one GPU (its stage's layers), in vLLM's
    hybrid layout: full-attention groups keep every token, sliding-window groups the window (plus the
    block it straddles), and padding layers of a group cost their pages too."""
    size, full, sliding = kv_groups(spec, pp)
    page = BLOCK_SIZE * kv_bytes_per_token_layer(spec, tp, dtype_bytes)
    window = spec.sliding_window or context
    return size * page * (full * _blocks(context) + sliding * min(_blocks(context), _blocks(window - 1) + 1))


def vllm_kv_tokens(spec: ModelSpec, kv_bytes: int, tp: int, pp: int, dtype_bytes: int, max_model_len: int,
                   max_num_batched_tokens: int) -> int:
    """The "GPU KV cache size: N tokens" vLLM reports for a KV budget of ``kv_bytes``: how many requests of
    ``max_model_len`` the block pool holds, times that length. A sliding-window group is charged what a
    request may hold at once, window - 1 + a full prefill chunk (vLLM's SlidingWindowSpec), so with chunks
    as long as the context a hybrid model reports fewer tokens than its layers' sum would suggest."""
    if kv_bytes <= 0:
        return 0
    size, full, sliding = kv_groups(spec, pp)
    num_blocks = kv_bytes // (size * BLOCK_SIZE * kv_bytes_per_token_layer(spec, tp, dtype_bytes))
    window = spec.sliding_window or max_model_len
    per_request = full * _blocks(max_model_len) + sliding * (
        _blocks(min(window - 1 + max_num_batched_tokens, max_model_len)) + 1)
    return int(num_blocks / per_request * max_model_len)


def weights_per_rank(spec: ModelSpec, tp: int, pp: int, dtype_bytes: int, linear_bytes: float | None = None) -> int:
    """Weight bytes on one GPU: linears and vocabulary split by TP, KV projections replicated
    when TP exceeds the KV heads, layers split by PP. ``linear_bytes``: the layers' linear weights
    when they are quantized (fp8: 1; AWQ 4-bit g128: ~0.52); norms, embeddings and the LM head stay in ``dtype_bytes``."""
    h, kv_rank = spec.hidden_size, kv_heads_per_rank(spec, tp)
    attn = 2 * h * spec.q_dim // tp + 2 * h * kv_rank * spec.head_dim
    mlp_total = sum(spec.layer_params(i) for i in range(spec.num_layers)) - spec.num_layers * (
        spec.attention_params() + spec.norms_per_layer * h)
    linear = spec.num_layers * attn + mlp_total // tp
    norms = spec.num_layers * spec.norms_per_layer * h
    vocab = spec.embedding_params * (1 if spec.tie_word_embeddings else 2) // tp
    vocab += spec.extra_params // tp  # a vision tower: vLLM shards its linears like the text model's
    return int(linear // pp * (linear_bytes or dtype_bytes)) + (norms // pp + vocab) * dtype_bytes


def vllm_batch_defaults(gpu: GpuType) -> tuple[int, int]:
    """``(max_num_seqs, max_num_batched_tokens)`` that vLLM's OpenAI server picks for a GPU
    (vllm/engine/arg_utils.py: larger on >= 70 GiB GPUs other than the A100)."""
    if gpu.memory_gib >= 160:
        return 1024, 16384
    if gpu.memory_gib >= 70 and not gpu.name.startswith("A100"):
        return 1024, 8192
    return 256, 2048


def serving_memory(spec: ModelSpec, gpu: GpuType, tp: int = 1, pp: int = 1, context: int | None = None,
                   gpu_memory_utilization: float = DEFAULT_UTILIZATION,
                   max_num_batched_tokens: int | None = None, max_num_seqs: int | None = None,
                   enforce_eager: bool = False, dtype_bytes: int | None = None,
                   expected_tokens: int | None = None, linear_bytes: float | None = None,
                   kv_dtype_bytes: int | None = None) -> ServingMemory:
    """What one vLLM replica of ``spec`` with TP x PP on ``gpu`` holds, and what KV cache is left
    (weights and KV cache in ``dtype_bytes``, default: the GPU's half precision; fp8 weights and KV
    cache through ``linear_bytes`` and ``kv_dtype_bytes``). The batch limits
    default to vLLM's own for the GPU; ``expected_tokens`` (default: min(2048, context)) is the
    length at which ``concurrent_at_expected`` counts requests."""
    dtype_bytes = dtype_bytes or DTYPE_BYTES[gpu.train_dtype]
    context = context or spec.max_position_embeddings
    default_seqs, default_batched = vllm_batch_defaults(gpu)
    max_num_seqs = max_num_seqs or default_seqs
    max_num_batched_tokens = max_num_batched_tokens or default_batched
    expected = min(expected_tokens or DEFAULT_EXPECTED_TOKENS, context)
    kv_bytes = kv_dtype_bytes or dtype_bytes
    w = weights_per_rank(spec, tp, pp, dtype_bytes, linear_bytes)
    # Profiling run: a forward of max_num_batched_tokens (MLP gate/up and activation dominate),
    # then the sampler on max_num_seqs rows of fp32 logits beside the kept hidden states; the
    # torch peak is the larger of the two.
    T = max_num_batched_tokens
    forward = T * dtype_bytes * (3 * spec.mlp_activation_width // tp + (spec.q_dim + 2 * spec.kv_dim) // tp
                                 + (4 + GEMMA2_EXTRA_HIDDEN * (spec.model_type == "gemma2")) * spec.hidden_size)
    sampler = max_num_seqs * spec.vocab_size * 4 // tp + T * spec.hidden_size * dtype_bytes
    act = max(forward, sampler)
    non_torch = FORWARD_NON_TORCH + (NCCL_PER_RANK if tp * pp > 1 else 0)
    outside = CUDA_CONTEXT + (0 if enforce_eager else CUDA_GRAPHS)
    kv = int(gpu_memory_utilization * gpu.memory_bytes) - w - act - non_torch
    per_token = -(-spec.num_layers * kv_bytes_per_token_layer(spec, tp, kv_bytes) // pp)
    max_len = _max_model_len(spec, kv, tp, pp, kv_bytes)
    kv_tokens = vllm_kv_tokens(spec, kv, tp, pp, kv_bytes, min(context, max_len) or context, max_num_batched_tokens)
    need = kv_bytes_for_sequence(spec, context, tp, pp, kv_bytes)
    need_expected = kv_bytes_for_sequence(spec, expected, tp, pp, kv_bytes)
    return ServingMemory(
        tensor_parallel=tp, pipeline_parallel=pp, gpu_memory_utilization=gpu_memory_utilization,
        weights=w, activation_peak=act, non_torch=non_torch, outside_budget=outside, kv_cache=kv, kv_bytes_per_token=per_token,
        kv_tokens=kv_tokens, max_model_len=max_len, context=context,
        concurrent_seqs=max(kv, 0) // need if need else 0, max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens, expected_tokens=expected,
        concurrent_at_expected=max(kv, 0) // need_expected if need_expected else 0,
    )


def _max_model_len(spec: ModelSpec, kv: int, tp: int, pp: int, dtype_bytes: int) -> int:
    """Largest context (<= max_position_embeddings) whose single sequence fits in ``kv`` bytes."""
    lo, hi = 0, spec.max_position_embeddings
    if kv <= 0:
        return 0
    while lo < hi:  # monotone in context: binary search
        mid = (lo + hi + 1) // 2
        if kv_bytes_for_sequence(spec, mid, tp, pp, dtype_bytes) <= kv:
            lo = mid
        else:
            hi = mid - 1
    return lo


# ---- decode speed -------------------------------------------------------------------------------
# A decode step reads the weights and the batch's KV cache (memory-bound) or multiplies the batch by
# the weights (compute-bound), whichever is slower, plus vLLM's own time per step and per running
# sequence (scheduling, sampling, detokenising). The bandwidth efficiency is fixed at 0.9 (what large GEMVs reach
# on Hopper); the two overheads were fitted (least squares on relative error, each model and concurrency
# weighted once) to five models' median TPOT on H100s at concurrency 1 to 32: Llama-3.2-1B bf16
# (bench/serve/results/h100-serve.json), Llama-3.1-8B FP8 (h100-serve-8b-fp8*.json) and the first held-out set
# (h100-decode-heldout.json: Llama-3.2-3B bf16, Mistral-7B FP8, Phi-3-mini bf16): within 10% on all but the
# 1B and 3B rows (-22%..+22%). The models in h100-decode-heldout-2.json were predicted with these constants
# before they ran.
BANDWIDTH_EFFICIENCY = 0.9
COMPUTE_EFFICIENCY = 0.5
STEP_OVERHEAD_S = 0.00144
PER_SEQUENCE_OVERHEAD_S = 26e-6
TP_ALLREDUCE_S = 12e-6  # two all-reduces per layer across NVLink, latency-bound at decode sizes


def decode_step_s(spec: ModelSpec, gpu: GpuType, mem: ServingMemory, concurrency: int,
                  fp8_matmul: bool = False) -> float:
    """Seconds of one decode step of ``concurrency`` sequences half-way through the expected length
    (the time per output token each of them sees). ``fp8_matmul``: fp8 weights multiplied on fp8
    tensor cores, which do twice the bf16 rate on every GPU that has them (data sheets)."""
    kv_read = concurrency * (mem.expected_tokens / 2) * mem.kv_bytes_per_token
    # a step reads every weight but the input embedding table, of which it looks up a few rows (a tied
    # table is the LM head too, and read whole)
    lookup_only = 0 if spec.tie_word_embeddings else spec.embedding_params // mem.tensor_parallel * 2
    t_mem = (mem.weights - lookup_only + kv_read) / (gpu.bandwidth_gbs * 1e9 * BANDWIDTH_EFFICIENCY)
    flops = 2 * spec.active_params / (mem.tensor_parallel * mem.pipeline_parallel) * concurrency
    rate = gpu.peak_tflops * (2 if fp8_matmul and gpu.supports_fp8 else 1)
    t_compute = flops / (rate * 1e12 * COMPUTE_EFFICIENCY)
    tp_sync = 2 * spec.num_layers * TP_ALLREDUCE_S if mem.tensor_parallel > 1 else 0
    return max(t_mem, t_compute) + STEP_OVERHEAD_S + PER_SEQUENCE_OVERHEAD_S * concurrency + tp_sync

