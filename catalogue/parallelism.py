"""Which tensor-parallel sizes are legal for a model, and how a global batch splits."""

from __future__ import annotations

from gpufleet.catalogue.errors import PlanError, fix
from gpufleet.catalogue.model import ModelSpec


def tp_is_legal(spec: ModelSpec, tp: int) -> bool:
    """vLLM's rule: TP divides the attention heads, and either divides the KV heads or is a
    multiple of them (KV heads are then replicated); a group-quantized checkpoint also needs
    whole quantization groups in every rank's shard."""
    if tp < 1 or spec.num_heads % tp:
        return False
    if not (spec.num_kv_heads % tp == 0 or tp % spec.num_kv_heads == 0):
        return False
    return _split_group_width(spec, tp) is None


# Checkpoints whose scales come per group of input features: vLLM shards a row-parallel layer's inputs
# (o_proj, down_proj) across TP ranks and refuses a shard that cuts a group ("not aligned with the
# quantized weight shape").
GROUPED_METHODS = ("awq", "gptq", "compressed-tensors")


def _split_group_width(spec: ModelSpec, tp: int) -> int | None:
    """The row-parallel input width whose TP shards would cut a quantization group, if any."""
    q = spec.quantization
    if not q or q.method not in GROUPED_METHODS or not q.group_size:
        return None
    widths = [spec.num_heads * spec.head_dim]  # o_proj's inputs
    if not spec.num_experts or len(spec.moe_layers) < spec.num_layers:
        widths.append(spec.intermediate_size)  # a dense down_proj's
    if spec.num_experts:
        widths += [spec.moe_intermediate_size, spec.shared_expert_intermediate_size]  # the experts'

    return next((w for w in widths if w and (w % tp or (w // tp) % q.group_size)), None)


def legal_tp_sizes(spec: ModelSpec, gpus_per_node: int) -> list[int]:
    """All legal TP sizes that fit in one node, ascending."""
    return [tp for tp in range(1, gpus_per_node + 1) if tp_is_legal(spec, tp)]


def check_tp(spec: ModelSpec, tp: int, gpus_per_node: int, needed_by: str | None = None) -> None:
    """Raise a PlanError naming the legal sizes if ``tp`` is not one of them; ``needed_by`` says
    what asked for that size (e.g. a pinned GPU count spanning nodes)."""
    legal = legal_tp_sizes(spec, gpus_per_node)
    if tp > gpus_per_node:
        raise PlanError(fix(f"tensor_parallel_size={tp} exceeds the {gpus_per_node} GPUs of one node",
                            f"use one of {legal} and add pipeline stages across nodes"))
    if tp not in legal:
        width = _split_group_width(spec, tp) if tp >= 1 and spec.num_heads % tp == 0 else None
        if width and spec.quantization:
            why = (f"split {spec.name}'s width {width} into whole {spec.quantization.method} groups of "
                   f"{spec.quantization.group_size} per rank ({width / spec.quantization.group_size:g} groups)")
        else:
            why = f"split {spec.name}'s {spec.num_heads} attention heads / {spec.num_kv_heads} KV heads evenly"
        if needed_by:
            raise PlanError(fix(f"{needed_by} tensor_parallel_size={tp}, which does not {why}", f"pin one of {legal}"))
        raise PlanError(fix(f"tensor_parallel_size={tp} does not {why}", f"use one of {legal}"))


def kv_heads_per_rank(spec: ModelSpec, tp: int) -> int:
    """KV heads each TP rank stores (replicated when TP exceeds the KV head count)."""
    return max(1, spec.num_kv_heads // tp)


def split_batch(global_batch: int, data_parallel: int, max_micro_batch: int) -> tuple[int, int]:
    """Split a global batch into (micro_batch, gradient_accumulation) for ``data_parallel`` ranks.

    DeepSpeed's identity: global = micro x accumulation x data_parallel. Picks the largest
    micro-batch <= ``max_micro_batch`` that divides the per-rank share.
    """
    if global_batch % data_parallel:
        raise PlanError(fix(f"global batch {global_batch} is not divisible by {data_parallel} data-parallel GPUs",
                            f"use a global batch that is a multiple of {data_parallel}"))
    per_rank = global_batch // data_parallel
    micro = max(m for m in range(1, min(per_rank, max(1, max_micro_batch)) + 1) if per_rank % m == 0)
    return micro, per_rank // micro
