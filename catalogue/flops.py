"""Model FLOPs of training, for model FLOPs utilisation (MFU).

The convention is PaLM's (Chowdhery et al. 2022, appendix B), the one MFU was defined with:
per trained token, 6 FLOPs per weight that takes part in a matmul (forward 2, backward 4) plus
attention's ``12 · layers · q_dim · seq_len`` (scores and weighted sum; forward 4, backward 8).
Work a run repeats or skips by choice is not model work: recomputation under gradient
checkpointing is not counted, and neither is the half of the attention square a causal kernel
skips (PaLM counts the full square).
"""

from __future__ import annotations

from typing import Literal

from gpufleet.catalogue.model import ModelSpec


def matmul_params(spec: ModelSpec) -> int:
    """Weights one token multiplies with: active parameters less the input embedding table
    (a lookup, not a matmul). A tied table is the LM head too, so it stays."""
    return spec.active_params - (0 if spec.tie_word_embeddings else spec.embedding_params)


def train_flops_per_token(spec: ModelSpec, seq_len: int, task: Literal["lora", "full"]) -> float:
    """Model FLOPs per trained token. LoRA: the frozen weights need no weight gradient, so 4
    FLOPs per weight (forward 2, input gradient 2); the adapters' own work is negligible."""
    per_weight = 6 if task == "full" else 4
    return per_weight * matmul_params(spec) + 12 * spec.num_layers * spec.q_dim * seq_len


def mfu(tokens_per_s: float, flops_per_token: float, peak_tflops: float) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over the hardware's dense peak."""
    return tokens_per_s * flops_per_token / (peak_tflops * 1e12)
