"""plan(): cheapest legal layouts, monotonicity, and errors that say what would work."""

import json

import pytest

from gpufleet.catalogue.errors import PlanError
from gpufleet.catalogue.gpus import get_gpu
from gpufleet.catalogue.memory import TrainSetup, estimate, fits
from gpufleet.catalogue.model import load_model
from gpufleet.catalogue.planner import plan


def test_70b_serve_on_h100_uses_tensor_parallel_in_one_node():
    p = plan(load_model("llama-3.1-70b"), "serve", get_gpu("H100-80GB"))
    assert p.tensor_parallel >= 2 and p.nodes == 1 and p.placement_strategy == "STRICT_PACK"


def test_405b_serve_needs_pipeline_stages_across_nodes():
    p = plan(load_model("llama-3.1-405b"), "serve", get_gpu("H100-80GB"))
    assert p.pipeline_parallel >= 2 and p.tensor_parallel == 8 and p.nodes == p.pipeline_parallel


def test_bundles_pin_gpu_type_with_accelerator_resource():
    p = plan(load_model("llama-3.1-70b"), "serve", get_gpu("H100-80GB"))
    assert len(p.bundles) == p.gpus
    assert p.bundles[0] == {"GPU": 1.0, "accelerator_type:H100": 0.001, "CPU": 4.0}


def test_t4_plans_train_in_fp16():
    assert plan(load_model("qwen2.5-0.5b"), "lora", get_gpu("T4")).dtype == "float16"


def test_training_batch_identity_holds():
    p = plan(load_model("llama-3.1-8b"), "full", get_gpu("A100-80GB"), global_batch=32, gpus=4)
    assert p.micro_batch * p.grad_accum * p.data_parallel == 32


@pytest.mark.parametrize("stage,offload", [(1, False), (2, False), (3, False), (3, True)])
@pytest.mark.parametrize("task", ["lora", "full"])
def test_more_gpus_never_raise_per_gpu_memory_for_a_fixed_layout(task, stage, offload):
    spec = load_model("llama-3.1-70b")
    peaks = [estimate(spec, TrainSetup(task=task, engine="deepspeed", data_parallel=n, zero_stage=stage,
                                       offload_optimizer=offload, grad_ckpt=True, seq_len=2048)).peak
             for n in (1, 2, 4, 8, 16)]
    assert peaks == sorted(peaks, reverse=True)


def test_more_tensor_parallel_gpus_never_raise_weights_per_gpu():
    spec, gpu = load_model("llama-3.1-70b"), get_gpu("H100-80GB")
    weights = [plan(spec, "serve", gpu, gpus=n).serving.weights for n in (2, 4, 8)]
    assert weights == sorted(weights, reverse=True)


@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_planned_peak_fits_the_gpu_at_every_pinned_count(n):
    gpu = get_gpu("A100-80GB")
    p = plan(load_model("qwen2.5-14b"), "lora", gpu, gpus=n)
    assert fits(p.memory.peak, gpu.memory_bytes, p.headroom)


def test_pinned_count_with_illegal_tp_names_legal_sizes():
    with pytest.raises(PlanError, match=r"use one of \[1, 2, 4\]"):
        plan(load_model("qwen2.5-7b"), "serve", get_gpu("H100-80GB"), gpus=8)


def test_pinned_count_across_nodes_needs_a_legal_node_wide_tp():
    with pytest.raises(PlanError, match=r"tensor_parallel_size=8, which does not split .* pin one of \[1, 2, 5\]"):
        plan(load_model("phi-3-medium-4k"), "serve", get_gpu("L4"), gpus=16)


def test_pinned_count_that_is_not_whole_nodes_is_refused():
    with pytest.raises(PlanError, match="12 GPUs are not a whole number of 8-GPU nodes"):
        plan(load_model("llama-3.1-70b"), "serve", get_gpu("H100-80GB"), gpus=12)


def test_too_small_request_says_what_would_fit():
    with pytest.raises(PlanError, match=r"does not fit on 2 x A10G: 131 GiB .* To fix: use llama-3.1-70b serve on \d+ x A10G"):
        plan(load_model("llama-3.1-70b"), "serve", get_gpu("A10G"), gpus=2)


def test_model_larger_than_whole_inventory_is_an_error():
    with pytest.raises(PlanError, match="up to 4 x A10G"):
        plan(load_model("llama-3.1-405b"), "serve", get_gpu("A10G"), max_gpus=4)


@pytest.mark.parametrize("field", ["gpus", "seq_len", "concurrency"])
def test_zero_or_negative_sizes_are_rejected(field):
    with pytest.raises(PlanError, match=f"{field}=0: Input should be greater than or equal to 1"):
        plan(load_model("qwen2.5-0.5b"), "serve", get_gpu("A10G"), **{field: 0})


def test_plan_dict_is_stable_and_carries_every_field():
    d = plan(load_model("qwen2.5-0.5b"), "serve", get_gpu("L4")).to_dict()
    assert json.dumps(d) == json.dumps(plan(load_model("qwen2.5-0.5b"), "serve", get_gpu("L4")).to_dict())
    assert d["placement"]["strategy"] == "PACK"
    train = plan(load_model("qwen2.5-0.5b"), "lora", get_gpu("L4")).to_dict()
    assert {"grad_ckpt", "offload_params", "offload_optimizer", "compile", "notes"} <= set(train)


@pytest.mark.parametrize("task", ["serve", "full", "qlora"])
def test_bfloat16_on_a_gpu_without_it_is_refused_with_fp16_as_the_fix(task):
    with pytest.raises(PlanError, match=r"dtype=bfloat16 needs compute capability 8.0\+; T4 has 7.5.*float16"):
        plan(load_model("qwen2.5-0.5b"), task, get_gpu("T4"), dtype="bfloat16")


def test_a_pinned_training_dtype_is_the_plans_dtype():
    assert plan(load_model("qwen2.5-0.5b"), "lora", get_gpu("H100-80GB"), dtype="float16").dtype == "float16"


def test_dtype_on_generate_is_refused_rather_than_ignored():
    with pytest.raises(PlanError, match="dtype=float32 is not planned for task 'generate'.*drop dtype"):
        plan(load_model("qwen2.5-0.5b"), "generate", get_gpu("H100-80GB"), dtype="float32")
