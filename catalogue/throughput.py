"""Training throughput of a layout: predicted tokens/s and GPU-hours, for choosing between layouts.

A step is its micro-steps' matmul work at a utilisation that grows with the work one micro-step gives each
GEMM (tokens x hidden), recomputation under gradient checkpointing, the gradient all-reduce across data-parallel
GPUs, and, under optimizer offload, DeepSpeed's CPU Adam and the PCIe copies it needs, which run after the
backward and overlap nothing. Calibrated on the committed single-GPU H100/H200 runs through `gpufleet train`
(bench/train/results; `tests/test_throughput.py` recomputes them): without offload 14-47% MFU, with
optimizer offload 9-20%, so one GPU with offload spends 3-4x the GPU-hours of enough GPUs to go without.
"""

from __future__ import annotations

from typing import Literal

from gpufleet.catalogue.flops import train_flops_per_token
from gpufleet.catalogue.gpus import GpuType
from gpufleet.catalogue.model import ModelSpec

# Hardware utilisation of the matmuls: rises linearly with a micro-step's tokens x hidden (small GEMMs leave
# the tensor cores idle), up to a ceiling. Fitted to the compiled full fine-tunes without offload on one H100
# (llama-3.2-1b at micro-batch 1-8, qwen2.5-1.5b at 1-4, llama-3.2-3b at 2: 10-47% MFU); the constants below
# were fitted together to every committed run (mean error 15%), so they are a calibration, not a held-out check.
UTILISATION_CEILING = 0.45
WORK_AT_CEILING = 16e6  # tokens x hidden of one micro-step where an H100 reaches the ceiling
H100_TFLOPS = 989  # a GPU with fewer tensor-core FLOPs fills up with proportionally smaller GEMMs
LORA_EFFICIENCY = 0.7  # LoRA steps measured at ~0.7x the full fine-tune's MFU (adapter kernels, frozen-weight casts)
EAGER_EFFICIENCY = 0.8  # without torch.compile (llama-3.2-1b, micro-batch 4: 0.37 against 0.45 MFU)
# Optimizer offload: DeepSpeed's CPU Adam over the parameters plus their fp32 round trip over PCIe, once per
# step, on the node's cores (shared by its GPUs' workers). Read off the four H100/H200 offload runs of 1.5B-8B
# models (0.7-1.6 billion parameters/s on 16-32-core hosts).
OFFLOAD_PARAMS_PER_S = 1.3e9
# ZeRO-3 parameter offload also streams the half-precision weights in for every forward and backward.
PCIE_GBS = 20.0


# QLoRA dequantizes the nf4 base in every matmul (bitsandbytes): 0.55x LoRA's rate, from the H100 runs.
QLORA_EFFICIENCY = 0.55
TASK_EFFICIENCY = {"full": 1.0, "lora": LORA_EFFICIENCY, "qlora": LORA_EFFICIENCY * QLORA_EFFICIENCY}


def utilisation(spec: ModelSpec, gpu: GpuType, micro_tokens: int, task: str, compiled: bool) -> float:
    """Fraction of the GPU's dense peak the matmuls of one micro-step reach."""
    full_at = WORK_AT_CEILING * gpu.peak_tflops / H100_TFLOPS
    u = min(UTILISATION_CEILING, UTILISATION_CEILING * micro_tokens * spec.hidden_size / full_at)
    return u * TASK_EFFICIENCY[task] * (1.0 if compiled else EAGER_EFFICIENCY)


def step_seconds(spec: ModelSpec, gpu: GpuType, *, task: Literal["lora", "qlora", "full"], seq_len: int, micro_batch: int,
                 grad_accum: int, data_parallel: int, gpus_per_node: int, grad_ckpt: bool, compiled: bool,
                 zero_stage: int, offload_optimizer: bool, offload_params: bool) -> float:
    """Seconds of one optimizer step of one data-parallel worker."""
    per_token = train_flops_per_token(spec, seq_len, "full" if task == "full" else "lora")
    micro_tokens = micro_batch * seq_len
    # checkpointing runs the forward twice: 8 of 6 FLOPs per weight (full), 6 of 4 (LoRA)
    recompute = (8 / 6 if task == "full" else 6 / 4) if grad_ckpt else 1.0
    rate = gpu.peak_tflops * 1e12 * utilisation(spec, gpu, micro_tokens, task, compiled)
    compute = grad_accum * micro_tokens * per_token * recompute / rate
    trained = spec.num_params if task == "full" else spec.num_params * 0.01  # adapters: ~1% of the weights
    comm = 0.0
    if data_parallel > 1:  # ring all-reduce (or reduce-scatter + all-gather) of half-precision gradients
        bus = gpu.interconnect_gbs if data_parallel <= gpus_per_node else min(gpu.interconnect_gbs, 12.5)
        comm = 2 * 2 * trained * (data_parallel - 1) / data_parallel / (bus * 1e9)
        if zero_stage == 3:  # the half-precision weights are gathered for every forward (twice under ckpt) and backward
            passes = 3 if grad_ckpt else 2
            comm += grad_accum * passes * 2 * spec.num_params * (data_parallel - 1) / data_parallel / (bus * 1e9)
    offload = 0.0
    if offload_optimizer:  # each node's CPU Adam updates its workers' shards: the node's share of the model
        workers_here = min(data_parallel, gpus_per_node)
        offload = trained * workers_here / data_parallel / OFFLOAD_PARAMS_PER_S
    if offload_params:  # each worker's shard of the half-precision weights comes in for every forward and backward
        offload += grad_accum * 2 * 2 * spec.num_params / data_parallel / (PCIE_GBS * 1e9)
    return compute + comm + offload


def tokens_per_second(step_s: float, global_batch: int, seq_len: int) -> float:
    """Trained tokens per second of the whole job."""
    return global_batch * seq_len / step_s


def gpu_hours_per_million_tokens(tokens_per_s: float, gpus: int) -> float:
    return gpus * 1e6 / tokens_per_s / 3600
