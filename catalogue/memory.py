"""Peak GPU memory of training and inference, as a formula of the model's config.

The model follows what the allocator actually holds, phase by phase:

* weights, gradients and optimizer states, from the parameter count and dtypes;
* activations autograd keeps, per token and per layer, from the layer's shapes
  (hidden ``h``, query width ``q``, KV width ``kv``, MLP width ``i``);
* the logits and cross-entropy buffers, per token, from the vocabulary ``V``.

Peak of a training step is the largest of three moments: the start of backward (all saved
activations plus the loss gradient buffers), the end of backward (all gradients plus one
layer being recomputed) and the optimizer step (torch's foreach AdamW allocates one
temporary the size of the trainable parameters).

The per-layer byte coefficients were fitted once against measured peaks on an H100
(``bench/memory/results/h100-measured.json``: 13 architectures, 182 cases) and are kept as
structural terms (e.g. "each RMSNorm keeps an fp32 copy of its input"), never looked up by
model name.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from gpufleet.catalogue.config import Config
from gpufleet.catalogue.errors import SpecError, fix
from gpufleet.catalogue.gpus import GIB
from gpufleet.catalogue.model import ModelSpec
from gpufleet.catalogue.quantization import OnTheFly, Quantization, bitsandbytes

Task = Literal["infer", "generate", "lora", "qlora", "full"]
# bfloat16/float16 as vLLM and torch name them; mixed: fp32 parameters under bf16 autocast.
Precision = Literal["bfloat16", "float16", "mixed"]

# ---- per-token logits/loss buffers (bytes per vocabulary entry) --------------------------
LOGITS_SAVED = 4  # fp32 log_softmax output kept for backward
SOFTCAP_SAVED = 2  # tanh output kept when final_logit_softcapping is set
LOSS_BACKWARD = 8  # fp32 grad of log_softmax input and of its output, live at backward start
INFER_LOGITS = 10  # bf16 logits + fp32 upcast + log_softmax output, under no_grad
# Under torch.compile the loss is one fused kernel: it keeps the bf16 logits (plus the capped
# ones under softcapping) and its backward writes one fp32 gradient of them.
COMPILED_LOGITS_SAVED = 2
COMPILED_SOFTCAP_SAVED = 1
# With gradient checkpointing the softcapped head keeps both the bf16 logits and their tanh: 4 bytes
# per entry in all (gemma-2-2b, ZeRO-2 offload, micro-batch 8 and 16: 3.95 measured from the phase
# peaks, bench/train/results/h200-offload-phases.json).
COMPILED_SOFTCAP_SAVED_CKPT = 2
COMPILED_LOSS_BACKWARD = 4
# What a GPU holds outside torch's allocator (CUDA context, cuBLAS workspaces, NCCL), and the
# default safety margin a plan keeps on top of the predicted peak for allocator fragmentation.
CUDA_CONTEXT = int(0.75 * GIB)
DEFAULT_HEADROOM = 0.10
# Untracked small saves per layer and token (position embeddings, attention logsumexp, ...).
LAYER_CONST = 1000
CKPT_CONST = 1000


class TrainSetup(Config):
    """How a model is run: task, precision, shapes and the distributed layout."""

    task: Task = Field(description=(
        "generate: transformers' generate() (prompt = seq, then new_tokens); infer: one forward with "
        "labels over every position; lora or full: a fine-tuning step; qlora: LoRA on a bitsandbytes nf4 base "
        "(peft's prepare_model_for_kbit_training, gradient checkpointing)."))
    dtype: Precision = Field(default="bfloat16", description=(
        "bfloat16/float16: parameters in half precision; mixed: fp32 parameters under bf16 autocast."))
    micro_batch: int = Field(default=1, ge=1, description="Sequences per GPU per forward pass.")
    seq_len: int = Field(default=2048, ge=1, description="Tokens per sequence.")
    grad_ckpt: bool = Field(default=False, description="Activation (gradient) checkpointing.")
    lora_rank: int = Field(default=16, ge=1)
    engine: Literal["torch", "deepspeed"] = Field(default="torch", description=(
        "torch: one GPU, torch.optim.AdamW (states in the parameters' dtype); "
        "deepspeed: fp32 master weights and fp32 Adam states, ZeRO-sharded."))
    grad_accum: int = Field(default=1, ge=1, description="Micro-batches per optimizer step.")
    new_tokens: int = Field(default=256, ge=0, description="generate: tokens generated after the prompt.")
    quantization: OnTheFly = Field(default="none", description=(
        "generate: load a 16-bit checkpoint quantized by bitsandbytes (int8: LLM.int8; nf4: 4-bit NormalFloat, "
        "bf16 compute)."))
    compile: bool = Field(default=False, description=(
        "torch.compile: inductor keeps fewer activations and fuses the loss (deepspeed engine only)."))
    data_parallel: int = Field(default=1, ge=1, description="GPUs sharing the ZeRO partitions.")
    zero_stage: int = Field(default=0, ge=0, le=3)
    offload_optimizer: bool = False
    offload_params: bool = False

    @model_validator(mode="after")
    def _check(self) -> TrainSetup:
        if self.offload_params and self.zero_stage != 3:
            raise ValueError(fix("offload_params needs zero_stage=3", "set zero_stage=3 or drop offload_params"))
        if self.task == "qlora" and (self.engine != "torch" or not self.grad_ckpt):
            raise ValueError(fix("qlora is planned as transformers + peft with gradient checkpointing",
                                 "use engine='torch' and grad_ckpt=True"))
        if self.quantization != "none" and self.task != "generate":
            raise ValueError(fix(f"quantization={self.quantization} is planned for task 'generate' only",
                                 "use --task generate, or drop --quantization"))
        if self.engine == "torch" and (self.data_parallel > 1 or self.zero_stage or self.offload_optimizer
                                       or self.compile or self.grad_accum > 1):
            raise ValueError(fix("ZeRO, offload, compile, grad_accum>1 and data_parallel>1 need engine='deepspeed'",
                                 "set engine='deepspeed'"))
        return self

    @property
    def tokens(self) -> int:
        return self.micro_batch * self.seq_len


class MemoryBreakdown(Config):
    """Bytes per GPU, by what holds them. ``peak`` is the allocator's high-water mark."""

    weights: int
    gradients: int = 0
    optimizer_states: int = 0
    master_weights: int = 0
    lora_adapters: int = 0
    activations: int = 0
    logits_and_loss: int = 0
    temporaries: int = 0
    peak: int
    peak_phase: str
    cpu_offload: int = Field(default=0, description="Bytes moved to host memory by ZeRO offload.")
    kv_cache: int = Field(default=0, description="generate: the KV cache at the peak.")

    @property
    def peak_gib(self) -> float:
        return self.peak / GIB

    def as_gib(self) -> dict[str, float | str]:
        out: dict[str, float | str] = {"peak_gib": round(self.peak_gib, 3), "peak_phase": self.peak_phase}
        for k, v in self.model_dump(exclude={"peak", "peak_phase"}).items():
            out[f"{k}_gib"] = round(v / GIB, 3)
        return out


def fits(peak: int, gpu_bytes: int, headroom: float = DEFAULT_HEADROOM) -> bool:
    """Whether a predicted allocator peak fits a GPU, keeping ``headroom`` and the CUDA context."""
    return peak * (1 + headroom) + CUDA_CONTEXT <= gpu_bytes


# ---- activations ---------------------------------------------------------------------------
def _norm_bytes(spec: ModelSpec) -> int:
    # An RMSNorm keeps its fp32 upcast input (4h) and the normalised half-precision tensor (2h);
    # Gemma's norm multiplies by (1 + w) in fp32, keeping one more fp32 tensor (8h in all).
    per = 8 if spec.family in ("gemma2", "gemma3") else 6
    return spec.norms_per_layer * per * spec.hidden_size


def layer_activation_bytes(spec: ModelSpec, task: Task, grad_ckpt: bool, precision: Precision = "bfloat16") -> float:
    """Bytes autograd keeps per token for one decoder layer (bf16 compute, SDPA attention)."""
    h, q, kv, i = spec.hidden_size, spec.q_dim, spec.kv_dim, spec.mlp_activation_width
    if grad_ckpt:  # only the layer input survives (plus rope tables); fp32 residual under autocast
        return (4 if precision == "mixed" else 2) * h + CKPT_CONST
    # residual input, norms, q/k/v after rope, attention output and its reshaped copy, MLP
    # input, gate, up, act(gate), act*up.
    a = 2 * h + _norm_bytes(spec) + 6 * q + 4 * kv + 8 * i + LAYER_CONST
    if spec.has_qk_norm:
        a += (8 if spec.family == "gemma3" else 6) * (q + kv)
    if spec.family == "phi3":  # fused qkv output stays alive as the storage of the v view
        a += 2.4 * (q + 2 * kv)
    if precision == "mixed":  # residual stream and norm inputs are fp32 under autocast
        a += 10 * h
    if task == "lora":
        a += _lora_activation_delta(spec)
    return a


def compiled_layer_activation_bytes(spec: ModelSpec, grad_ckpt: bool) -> float:
    """Bytes one decoder layer keeps per token under torch.compile (bf16, SDPA).

    Inductor saves the matmul inputs and recomputes the pointwise work in backward: per norm
    its input and normalised output, the residual stream after attention, q/k/v and the
    attention output, gate and up (act(gate)*up is recomputed). Measured on an H100
    (bench/train/results/h100-compile-*.json).
    """
    h, q, kv, i = spec.hidden_size, spec.q_dim, spec.kv_dim, spec.mlp_activation_width
    if grad_ckpt:
        return 2 * h + CKPT_CONST
    a = 4 * spec.norms_per_layer * h + 4 * h + 4 * q + 4 * kv + 6 * i
    if spec.has_qk_norm:
        a += 4 * (q + kv)
    return a


def _lora_activation_delta(spec: ModelSpec) -> float:
    # peft casts each adapted linear's input to the adapters' fp32, while the frozen base
    # linears no longer keep their inputs; where a norm already keeps them (Gemma) or the
    # projections are fused (Phi-3) less changes.
    h, q, kv, i = spec.hidden_size, spec.q_dim, spec.kv_dim, spec.mlp_activation_width
    if spec.family == "phi3":
        return 2 * h + 2 * i
    if spec.family == "gemma2":
        return 4 * h + 2 * i
    if spec.family == "gemma3":
        return 2 * i
    delta = 8 * h + 8 * q + 2 * i
    if spec.has_qk_norm:
        delta -= 2 * (q + kv)
    return delta


def lora_params(spec: ModelSpec, rank: int) -> int:
    """Parameters of rank-``rank`` adapters on every linear layer but the LM head (peft all-linear).

    MoE expert weights are fused 3-D tensors in transformers 5, which peft's all-linear skips;
    routers and shared experts are linear and get adapters.
    """
    h, q, kv, i = spec.hidden_size, spec.q_dim, spec.kv_dim, spec.intermediate_size
    attn = (h + q) + 2 * (h + kv) + (q + h)
    if spec.family == "phi3":
        attn = (h + q + 2 * kv) + (q + h)
    dense_mlp = 3 * (h + i) if spec.family != "phi3" else (h + 2 * i) + (i + h)
    total = 0
    for layer in range(spec.num_layers):
        if layer in spec.moe_layers:
            mlp = h + spec.num_experts
            if spec.shared_expert_intermediate_size:
                mlp += 3 * (h + spec.shared_expert_intermediate_size) + (h + 1)
        else:
            mlp = dense_mlp
        total += attn + mlp
    return rank * total


def _half_copies(spec: ModelSpec, grad_ckpt: bool) -> int:
    """bf16 copies autocast makes of fp32 weights and autograd keeps until backward.

    Without checkpointing every linear's copy is kept; with it, the layers drop theirs and
    recast on recompute, so only the LM head's copy (outside the checkpointed layers) stays.
    """
    if grad_ckpt:
        return 2 * spec.embedding_params
    return 2 * (spec.num_params - (0 if spec.tie_word_embeddings else spec.embedding_params))


# ---- single GPU, torch.optim.AdamW (the `gpufleet estimate` reference recipe) ------------------
def estimate(spec: ModelSpec, setup: TrainSetup) -> MemoryBreakdown:
    """Peak memory per GPU for ``setup`` (dispatches on ``setup.engine``)."""
    if setup.task == "generate":
        return generate_memory(spec, setup.micro_batch, setup.seq_len, setup.new_tokens,
                               4 if setup.dtype == "mixed" else 2, on_the_fly(spec, setup.quantization))
    if setup.task == "qlora":
        return qlora_memory(spec, setup)
    if setup.engine == "deepspeed":
        return _deepspeed(spec, setup)
    return _torch_single_gpu(spec, setup)


# ---- QLoRA (transformers + peft + bitsandbytes nf4, torch AdamW) ---------------------------------
# prepare_model_for_kbit_training casts every parameter bitsandbytes left in 16 bits (embeddings, norms,
# an untied LM head, biases) to fp32, so the residual stream and the logits are fp32: per token the
# checkpointed layer inputs keep 4h per layer, and the loss holds fp32 logits, their log-softmax and its
# gradient (12 bytes per vocabulary entry; +4 for Gemma's soft-capped copy). Measured on an H100
# (bench/memory/results/h100-quantized.json, 4 models x 2 shapes).
QLORA_LOGITS = 12
QLORA_SOFTCAP = 4


def qlora_memory(spec: ModelSpec, s: TrainSetup) -> MemoryBreakdown:
    """Peak of one QLoRA step: nf4 linears + fp32 rest + fp32 adapters, their gradients and Adam states,
    checkpointed fp32 layer inputs and the fp32 loss buffers."""
    weights = spec.weight_bytes(4, bitsandbytes("nf4"))  # nf4 linears, everything else fp32
    adapters = 4 * lora_params(spec, s.lora_rank)
    T = s.tokens
    acts = T * spec.num_layers * 4 * spec.hidden_size
    logits = T * spec.vocab_size * (QLORA_LOGITS + (QLORA_SOFTCAP if spec.final_logit_softcapping else 0))
    peak = weights + adapters + adapters + 2 * adapters + acts + logits  # + grads + exp_avg, exp_avg_sq
    return MemoryBreakdown(weights=weights, lora_adapters=adapters, gradients=adapters,
                           optimizer_states=2 * adapters, activations=acts, logits_and_loss=logits, peak=peak,
                           peak_phase="backward start")


# ---- generate() (transformers, SDPA, DynamicCache) ----------------------------------------------
GENERATE_LOGITS = 10  # per vocabulary entry of the last position: half-precision logits, fp32 copy, scores
INT8_ACCUMULATOR = 4  # LLM.int8 matmuls write int32 outputs before scaling back: 4 bytes per output


def on_the_fly(spec: ModelSpec, quant: OnTheFly) -> Quantization | None:
    """bitsandbytes quantization asked for at load time; a checkpoint quantized already refuses it."""
    if quant != "none" and spec.quantization:
        raise SpecError(fix(f"{spec.name} is already quantized ({spec.quantization.label}); quantization={quant} "
                            "would quantize it again", "drop --quantization"))
    return bitsandbytes(quant)


def generate_memory(spec: ModelSpec, batch: int, prompt: int, new_tokens: int, dtype_bytes: int = 2,
                    quant: Quantization | None = None) -> MemoryBreakdown:
    """Peak of a greedy ``generate()``: the larger of two moments.

    * prefill: weights, the KV cache of the whole prompt (sliding-window layers too: the window is
      applied after the prefill), one layer's MLP transient over the prompt (gate, up, act(gate),
      act*up: 4 x the MLP width per token in half precision) and the last position's logits;
    * last decode step: the KV cache of prompt + new tokens (sliding-window layers keep their
      window), one layer's cache copied as it grows (DynamicCache concatenates), and the logits.

    Quantized weights (the checkpoint's ``quantization_config`` or ``quant``) count their own bytes;
    bitsandbytes int8 also writes the widest matmul's int32 output in the prefill.

    Measured on an H100 (bench/memory/results/h100-generate.json: 7 architectures, bf16 and fp16;
    h100-generate-heldout.json: cases the terms were not chosen from; h100-quantized.json: int8, nf4).
    """
    quant = quant or spec.quantization
    weights = spec.weight_bytes(dtype_bytes, quant)
    per_token_layer = 2 * spec.kv_dim * dtype_bytes
    logits = batch * spec.vocab_size * GENERATE_LOGITS
    kv_prompt = batch * spec.num_layers * prompt * per_token_layer
    transient = batch * prompt * 4 * spec.mlp_activation_width * dtype_bytes
    if quant and quant.method == "bitsandbytes" and quant.bits == 8:
        transient += batch * prompt * INT8_ACCUMULATOR * spec.mlp_activation_width
    total = prompt + new_tokens
    kv_end = batch * sum(spec.kv_tokens_per_layer(total)) * per_token_layer
    grow_copy = batch * total * per_token_layer
    moments = {"prefill": (kv_prompt, transient), "last decode step": (kv_end, grow_copy)}
    phase = max(moments, key=lambda k: sum(moments[k]))
    kv, act = moments[phase]
    return MemoryBreakdown(weights=weights, kv_cache=kv, activations=act, logits_and_loss=logits,
                           peak=weights + kv + act + logits, peak_phase=phase)


def _logits_saved(spec: ModelSpec) -> int:
    return (LOGITS_SAVED + (SOFTCAP_SAVED if spec.final_logit_softcapping else 0)) * spec.vocab_size


def _torch_single_gpu(spec: ModelSpec, s: TrainSetup) -> MemoryBreakdown:
    T, V, L, P = s.tokens, spec.vocab_size, spec.num_layers, spec.num_params
    if s.task == "infer":
        w = P * (4 if s.dtype == "mixed" else 2)
        transient = T * (INFER_LOGITS * V + 4 * spec.hidden_size)
        return MemoryBreakdown(weights=w, logits_and_loss=transient, peak=w + transient, peak_phase="forward")

    if s.task == "lora":
        weights = 2 * P
        adapters = 4 * lora_params(spec, s.lora_rank)  # peft keeps adapters in fp32
        trainable = adapters
    else:
        weights = P * (4 if s.dtype == "mixed" else 2)
        adapters = 0
        trainable = weights
    grads = trainable
    states = 2 * trainable  # exp_avg, exp_avg_sq in the parameters' dtype
    acts = int(T * L * layer_activation_bytes(spec, s.task, s.grad_ckpt, s.dtype))
    if s.dtype == "mixed" and s.task == "full":
        acts += _half_copies(spec, s.grad_ckpt)
    saved_logits = T * _logits_saved(spec)
    loss_bwd = T * LOSS_BACKWARD * V
    one_layer = int(T * layer_activation_bytes(spec, s.task, False, s.dtype))

    base = weights + adapters + states
    moments = {
        "backward start": base + acts + saved_logits + loss_bwd,
        "backward end": base + grads + (one_layer if s.task == "full" else 0),
        "optimizer step": base + grads + trainable,  # foreach AdamW: one sqrt(v) temporary
    }
    phase = max(moments, key=moments.__getitem__)
    return MemoryBreakdown(
        weights=weights, gradients=grads, optimizer_states=states, lora_adapters=adapters,
        activations=acts, logits_and_loss=saved_logits + loss_bwd, temporaries=trainable,
        peak=moments[phase], peak_phase=phase,
    )


# ---- host memory of a training worker -------------------------------------------------------------
HOST_BASE = 2 * GIB  # a worker's own RSS: Python, torch, the CUDA and NCCL host state, Ray (~2 GiB measured)


def host_peak(spec: ModelSpec, setup: TrainSetup, mem: MemoryBreakdown) -> int:
    """A training worker's peak RSS: the process itself and the larger of the half-precision model
    from_pretrained loads on the CPU (freed when DeepSpeed moves it to the GPU) and what ZeRO-1/2
    then offloads; ZeRO-3 offloads from the loaded model, so there both count
    (bench/train/results/h100-train-mode-layouts.json)."""
    half = 4 if setup.dtype == "mixed" else 2
    loaded = half * spec.num_params
    if setup.zero_stage == 3:
        return int(mem.cpu_offload + loaded + HOST_BASE)
    return int(max(mem.cpu_offload, loaded) + HOST_BASE)


# ---- DeepSpeed ZeRO ---------------------------------------------------------------------------
# Communication buckets gpufleet's generated DeepSpeed config uses (elements); see jobs/.
REDUCE_BUCKET = 200_000_000
ALLGATHER_BUCKET = 200_000_000
STAGE3_PREFETCH = 100_000_000
STAGE3_MAX_LIVE = 200_000_000


def _pinned(nbytes: float) -> int:
    """Bytes torch's caching host allocator pins for one allocation: the next power of two."""
    return 1 << max(int(nbytes) - 1, 0).bit_length() if nbytes else 0


def _deepspeed(spec: ModelSpec, s: TrainSetup) -> MemoryBreakdown:
    """ZeRO memory per GPU: half-precision params and grads, fp32 master weights and Adam states,
    partitioned by stage across ``data_parallel`` ranks and optionally offloaded to the host.

    Measured on an H100 (bench/train): ZeRO-1/2 allocate the fp32 gradient partition only inside
    the optimizer step, and DeepSpeed's bf16/fp16 mode casts LoRA adapters to half precision too,
    so peft makes no fp32 copies of their inputs (LoRA activations equal full fine-tuning's); the
    optimizer step holds one more half-precision copy of the trainable partition. Under
    ``compile`` the activations and loss buffers follow ``compiled_layer_activation_bytes`` and
    the ``COMPILED_*`` constants (bench/train/results/h100-compile-*.json).
    """
    if s.task == "infer":
        raise SpecError(fix("engine='deepspeed' is for training", "use engine='torch' for task 'infer'"))
    dp, z, T, V, L, P = s.data_parallel, s.zero_stage, s.tokens, spec.vocab_size, spec.num_layers, spec.num_params
    lora = s.task == "lora"
    n_train = lora_params(spec, s.lora_rank) if lora else P
    half = 4 if s.dtype == "mixed" else 2
    shard = dp if z >= 1 else 1
    # LoRA: the frozen base is never partitioned by the optimizer, only by ZeRO-3.
    params = half * (P + (n_train if lora else 0)) / (dp if z == 3 else 1)
    grads = half * n_train / (dp if z >= 2 else 1)
    master = 4 * n_train / shard
    states = 8 * n_train / shard  # exp_avg, exp_avg_sq in fp32
    fp32_grads = 4 * n_train / shard  # built for the optimizer step, freed after it
    offloaded = 0.0
    staging = 0  # ZeRO-1/2 offload: a GPU buffer of the largest parameter (the embedding) for host copies
    norm_copy = 0  # ZeRO-1/2 offload: the fp64 copy a gradient's norm is taken from (DeepSpeed's get_norm_dtype)
    if s.offload_optimizer and z in (1, 2):
        # DeepSpeed pins the fp32 master and gradient partitions, a half-precision copy of the
        # partition and a host twin of the GPU staging buffer; torch's pinned allocator rounds each
        # allocation up to a power of two. Adam's states are plain host memory. Micro-batch gradients
        # accumulate on the host in one pinned half-precision buffer per parameter, each rounded up
        # too (llama-3.2-3b: 254 buffers, 5.98 GiB asked, 8.44 GiB pinned; logged pin_memory calls in
        # bench/train/results/h200-offload-phases.json).
        staging = half * spec.embedding_params
        tensors = spec.parameter_tensors()
        offloaded += (_pinned(master) + _pinned(fp32_grads) + _pinned(half * n_train / shard) + _pinned(staging)
                      + states)
        if s.grad_accum > 1:
            offloaded += (half * n_train if lora else sum(_pinned(half * n) for n in tensors)) / shard
        if spec.final_logit_softcapping and s.compile:
            # Gemma-2 (compiled, checkpointed) also holds one pinned block the size of the bf16 logits
            # after its first step; DeepSpeed's pin_memory calls do not make it (none in the step), what
            # does is not identified. Measured at micro-batch 8 and 16 (+8 and +16 GiB), in Ray Train too.
            offloaded += _pinned(half * T * V)
        norm_copy = 8 * (max(tensors) if not lora else n_train)
        master = states = fp32_grads = 0
    elif s.offload_optimizer:
        offloaded += master + states + fp32_grads
        master = states = fp32_grads = 0
        if s.grad_accum > 1:
            offloaded += 4 * n_train / shard
    if s.offload_params:
        offloaded += params
        params = half * STAGE3_MAX_LIVE  # only the live, gathered layers stay on the GPU
    buckets = half * (REDUCE_BUCKET + ALLGATHER_BUCKET) if z in (1, 2) else 0
    if z == 3:
        buckets = half * (STAGE3_PREFETCH + REDUCE_BUCKET) + half * max(
            spec.layer_params(i) for i in range(L)) * 2
    act_task: Task = "full" if s.dtype in ("bfloat16", "float16") else s.task
    if s.compile:
        acts = int(T * L * compiled_layer_activation_bytes(spec, s.grad_ckpt))
        softcap = COMPILED_SOFTCAP_SAVED_CKPT if s.grad_ckpt else COMPILED_SOFTCAP_SAVED
        saved = COMPILED_LOGITS_SAVED + (softcap if spec.final_logit_softcapping else 0)
        # the first layer backward reaches (no checkpointing) recomputes act(gate) in fp32
        logits = T * ((saved + COMPILED_LOSS_BACKWARD) * V + (0 if s.grad_ckpt else 4 * spec.mlp_activation_width))
    else:
        acts = int(T * L * layer_activation_bytes(spec, act_task, s.grad_ckpt, "bf16"))
        logits = T * (_logits_saved(spec) + LOSS_BACKWARD * V)
    base = params + master + states
    # Between the micro-batches of one optimizer step the half-precision gradients stay, and
    # under ZeRO-1 so do its reduce and all-gather buckets. ZeRO-1/2 may also still hold the
    # previous step's half-precision gradients when the next forward starts (seen in 4 of 7
    # compiled runs on an H100; overlap_comm frees them on a side stream): count them.
    # Under offload only the staging buffer stays: every micro-batch's gradients go to the host and
    # the offloaded step frees the previous ones (allocated bytes before a forward = weights +
    # staging in llama-3.2-3b 2 x 8, qwen2.5-1.5b 4 x 4 and 4 x 1, gemma-2-2b; 8B: 47.9 GiB measured).
    if staging:
        carried = staging
    elif z == 3:
        # ZeRO-3 allocates its gradient partition (one flat buffer in the model's dtype, DeepSpeed's
        # grad_accum_dtype default; on the host under optimizer offload) and its reduce bucket when the
        # optimizer is set up, so both are live from the first forward (deepspeed 0.19.8 stage3.py,
        # _setup_for_real_optimizer). Read from the source after the first ZeRO-3 run, which was 6.3% over.
        carried = (0 if s.offload_optimizer else grads) + half * REDUCE_BUCKET
    else:
        carried = (grads + (buckets if z == 1 else 0)) if s.grad_accum > 1 else 0
        if z in (1, 2):
            carried += grads
    moments = {
        "backward start": base + carried + acts + logits,
        # under offload the gradients meet the staging buffer and the fp64 copy of the largest one
        # (llama-3.2-3b 2 x 8: the allocation trace at its peak, bench/train/results/h200-offload-phases.json)
        "backward end": (base + grads + buckets + T * layer_activation_bytes(spec, act_task, False)
                         + staging + norm_copy),
        # the step also holds one more half-precision copy of the trainable partition (on the
        # host, pinned, under ZeRO-1/2 offload)
        "optimizer step": base + grads + fp32_grads + (staging or half * n_train / shard),
    }
    phase = max(moments, key=moments.__getitem__)
    return MemoryBreakdown(
        weights=int(params), gradients=int(grads), optimizer_states=int(states + fp32_grads),
        master_weights=int(master), activations=acts, logits_and_loss=int(logits), temporaries=int(buckets),
        peak=int(moments[phase]), peak_phase=phase, cpu_offload=int(offloaded),
    )

