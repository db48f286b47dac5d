"""Tensor-parallel legality and batch splitting."""

import pytest

from gpufleet.catalogue.errors import PlanError
from gpufleet.catalogue.model import load_model
from gpufleet.catalogue.parallelism import check_tp, legal_tp_sizes, split_batch


def test_28_heads_4_kv_heads_on_8_gpus_allow_tp_1_2_4():
    assert legal_tp_sizes(load_model("qwen2.5-7b"), gpus_per_node=8) == [1, 2, 4]


def test_tp_may_be_a_multiple_of_kv_heads():
    # 32 heads, 8 KV heads: TP=16 would replicate KV heads, but is beyond one 8-GPU node
    assert legal_tp_sizes(load_model("llama-3.1-8b"), gpus_per_node=16) == [1, 2, 4, 8, 16]


def test_illegal_tp_names_legal_sizes():
    with pytest.raises(PlanError, match=r"does not split .* To fix: use one of \[1, 2, 4\]"):
        check_tp(load_model("qwen2.5-7b"), 8, 8)


def test_tp_beyond_one_node_is_refused():
    with pytest.raises(PlanError, match="exceeds the 8 GPUs of one node"):
        check_tp(load_model("llama-3.1-8b"), 16, 8)


def test_batch_split_keeps_deepspeed_identity():
    micro, accum = split_batch(64, 4, max_micro_batch=6)
    assert (micro, accum) == (4, 4) and micro * accum * 4 == 64


def test_indivisible_global_batch_is_an_error():
    with pytest.raises(PlanError, match="not divisible by 3"):
        split_batch(16, 3, 4)
