"""Typed plans: one request type, one plan type per task family, and what each carries."""

import json

import pytest
from click.testing import CliRunner

from gpufleet.catalogue.errors import PlanError, SpecError
from gpufleet.catalogue.memory import generate_memory
from gpufleet.catalogue.model import builtin_models, load_model, spec_from_config
from gpufleet.catalogue.placement import NodeCapacity, check_feasible
from gpufleet.catalogue.planner import plan
from gpufleet.catalogue.plans import InferPlan, ServePlan, TrainPlan
from gpufleet.cli import main
from gpufleet.jobs.finetune import scaling_kwargs
from gpufleet.jobs.layout import resolve_layout
from gpufleet.jobs.spec import JobSpec

LLAMA = json.loads(builtin_models()["llama-3.2-1b"].read_text())


def test_each_task_family_gets_its_own_plan_type():
    spec = load_model("llama-3.2-1b")
    assert isinstance(plan(spec, "serve", "H100"), ServePlan)
    assert isinstance(plan(spec, "lora", "H100"), TrainPlan)
    assert isinstance(plan(spec, "infer", "H100"), InferPlan)


def test_serve_plan_carries_the_vllm_engine_kwargs():
    p = plan(load_model("llama-3.1-8b"), "serve", "H100", seq_len=8192)
    assert p.engine_kwargs == {"tensor_parallel_size": 1, "pipeline_parallel_size": 1, "max_model_len": 8192,
                               "gpu_memory_utilization": 0.9, "dtype": "bfloat16",
                               "max_num_seqs": p.max_ongoing_requests, "max_num_batched_tokens": 8192}


def test_serve_batch_cap_follows_the_expected_length_not_the_full_context():
    spec = load_model("llama-3.1-8b")
    short, long = (plan(spec, "serve", "H100", seq_len=8192, expected_tokens=n) for n in (1024, 8192))
    assert short.engine_kwargs["max_num_seqs"] > 3 * long.engine_kwargs["max_num_seqs"]
    assert long.engine_kwargs["max_num_seqs"] == long.serving.concurrent_seqs  # full-context requests that fit
    tiny = plan(load_model("llama-3.2-1b"), "serve", "H100", seq_len=2048, expected_tokens=256)
    assert tiny.engine_kwargs["max_num_seqs"] == 1024  # vLLM's own cap on an H100


def test_cpu_serving_is_a_plan_with_cpu_bundles_and_kv_space():
    p = plan(load_model("qwen2.5-0.5b"), "serve", "CPU", gpus=2, seq_len=1024, cpu_kv_cache_gib=2)
    assert p.placement.bundles == [{"CPU": 1.0}, {"CPU": 1.0}] and p.placement.strategy == "STRICT_PACK"
    assert p.engine_kwargs["dtype"] == "float32" and p.engine_kwargs["enforce_eager"] is True
    assert p.engine_env == {"VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_CPU_OMP_THREADS_BIND": "0|1"}


def test_cli_serve_plan_json_shows_engine_kwargs_for_cpu():
    r = CliRunner().invoke(main, ["plan", "qwen2.5-0.5b", "--task", "serve", "--gpu", "CPU", "--seq-len", "512", "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    assert d["engine_kwargs"]["max_model_len"] == 512 and d["placement"]["bundles"] == [{"CPU": 1.0}]


def test_training_on_cpu_has_no_plan():
    with pytest.raises(PlanError, match="task 'lora' has no CPU plan"):
        plan(load_model("qwen2.5-0.5b"), "lora", "CPU")


def test_printed_train_plan_is_what_ray_train_reserves():
    job = JobSpec(model="m", dataset="d", task="full", max_steps=1, gpu="H100-80GB", global_batch=32, seq_len=2048)
    p = plan(load_model("llama-3.2-1b"), "full", "H100-80GB", seq_len=2048, global_batch=32)
    kw = scaling_kwargs(resolve_layout(job, load_model("llama-3.2-1b")).placement)
    # Ray Train adds the accelerator pin back to resources_per_worker from accelerator_type
    reserved = [{**kw["resources_per_worker"], f"accelerator_type:{kw['accelerator_type']}": 0.001}] * kw["num_workers"]
    assert reserved == p.placement.bundles and kw["placement_strategy"] == p.placement.strategy


def test_pinned_gpus_above_the_inventory_is_refused():
    with pytest.raises(PlanError, match="gpus=16 exceeds max_gpus=8"):
        plan(load_model("llama-3.1-70b"), "serve", "H100", gpus=16, max_gpus=8)


def test_serve_context_above_the_models_positions_is_refused():
    with pytest.raises(SpecError, match="seq_len=200000 exceeds the model's max_position_embeddings=131072"):
        plan(load_model("llama-3.1-8b"), "serve", "H100", seq_len=200_000)


def test_global_batch_that_does_not_divide_is_named_as_such():
    with pytest.raises(PlanError, match="global batch 10 is not divisible by 4 GPUs"):
        plan(load_model("llama-3.1-8b"), "full", "H100", gpus=4, global_batch=10)


@pytest.mark.parametrize("change,message", [
    ({"hidden_size": "2048"}, "hidden_size='2048'. To fix: set 'hidden_size' to a positive integer"),
    ({"num_key_value_heads": 0}, "num_key_value_heads=0"),
    ({"torch_dtype": "float8"}, "torch_dtype='float8'. To fix: use one of"),
])
def test_bad_config_values_are_one_line_errors(change, message):
    with pytest.raises(SpecError, match=message):
        spec_from_config({**LLAMA, **change})


def test_config_that_is_not_an_object_is_refused():
    with pytest.raises(SpecError, match="holds a list, not an object of keys"):
        spec_from_config([LLAMA])


def test_plan_options_come_from_the_request_fields():
    r = CliRunner().invoke(main, ["plan", "--help"])
    assert "GPUs per node of the cluster." in r.output and "[default: 8]" in r.output


def test_offload_plan_states_its_host_memory_and_reserves_it():
    p = plan(load_model("llama-3.1-8b"), "full", "H100", objective="gpus")
    assert p.offload_optimizer and p.host_bytes_per_gpu == p.memory.cpu_offload > 100 * 2**30
    assert all(b["memory"] == p.host_bytes_per_gpu for b in p.placement.bundles)


def test_offload_plan_that_no_node_can_hold_in_host_memory_is_refused():
    p = plan(load_model("llama-3.1-8b"), "full", "H100", objective="gpus")
    small = NodeCapacity(name="n", resources={"CPU": 32, "GPU": 8, "accelerator_type:H100": 1, "memory": 64 * 2**30})
    with pytest.raises(PlanError, match=r"needs 141 GiB of host memory .* offers 64 GiB.*pin more GPUs"):
        check_feasible(p.placement.bundles, p.placement.strategy, [small])
    check_feasible(p.placement.bundles, p.placement.strategy, [small.model_copy(update={"resources": {
        **small.resources, "memory": 512 * 2**30}})])


def test_generate_peak_is_prefill_for_a_long_prompt_and_decode_for_long_outputs():
    spec = load_model("llama-3.2-1b")
    assert generate_memory(spec, 1, 2048, 16).peak_phase == "prefill"
    assert generate_memory(spec, 8, 128, 2048).peak_phase == "last decode step"


def test_generate_keeps_only_the_window_of_sliding_layers_after_the_prefill():
    gemma = load_model("gemma-3-1b")  # 5 of 6 layers slide over 512 tokens
    long = generate_memory(gemma, 1, 64, 8000)
    full_cache = 8064 * gemma.num_layers * 2 * gemma.kv_dim * 2
    assert long.kv_cache < full_cache / 3


def test_estimate_generate_json_has_the_peak_and_kv_cache():
    r = CliRunner().invoke(main, ["estimate", "--config", "qwen2.5-0.5b", "--task", "generate", "--micro-batch", "1",
                                  "--seq-len", "2048", "--new-tokens", "256", "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    assert 0.9 < d["peak_gib"] < 1.2 and d["kv_cache_gib"] > 0 and d["new_tokens"] == 256


def test_generate_plan_splits_layers_over_one_node_only():
    p = plan(load_model("gemma-2-9b"), "generate", "P4", gpus=4)
    assert p.dtype == "float16" and p.pipeline_parallel == 4 and p.nodes == 1 and p.peak_gib < 7.4
    with pytest.raises(PlanError, match="generate runs in one process on one node"):
        plan(load_model("gemma-2-9b"), "generate", "P4", gpus=16)


def test_fp8_halves_kv_bytes_and_the_linear_weights_on_hopper():
    spec = load_model("llama-3.1-8b")
    bf16 = plan(spec, "serve", "H100", seq_len=8192)
    fp8 = plan(spec, "serve", "H100", seq_len=8192, quantization="fp8", kv_cache_dtype="fp8")
    assert fp8.serving.kv_bytes_per_token * 2 == bf16.serving.kv_bytes_per_token
    embeddings = 2 * spec.embedding_params * 2  # untied input and output tables stay bf16
    assert fp8.serving.weights - embeddings == pytest.approx((bf16.serving.weights - embeddings) / 2, rel=0.01)
    assert fp8.engine_kwargs["quantization"] == "fp8" and fp8.engine_kwargs["kv_cache_dtype"] == "fp8"
    assert fp8.serving.kv_tokens > 2 * bf16.serving.kv_tokens


def test_fp8_on_a_gpu_without_fp8_is_refused_with_the_reason():
    with pytest.raises(PlanError, match=r"quantization=fp8 needs fp8 tensor cores .* A100-80GB has 8.0"):
        plan(load_model("llama-3.1-8b"), "serve", "A100-80GB", quantization="fp8")


def test_a_pinned_training_layout_is_searched_for_the_fewest_gpus_that_hold_it():
    p = plan(load_model("llama-3.1-8b"), "full", "H100-80GB", seq_len=2048, global_batch=16, zero_stage=3,
             offload_optimizer=False)
    assert (p.gpus, p.zero_stage, p.offload_optimizer) == (4, 3, False)  # 82 GiB per GPU at two
    assert p.peak_bytes_per_gpu < 79.2 * 2**30 * 0.9


def test_layout_pins_on_a_serve_plan_are_refused_in_one_line():
    with pytest.raises(PlanError, match=r"layout pins \(zero_stage\) apply to training, not to task 'serve'"):
        plan(load_model("llama-3.1-8b"), "serve", "H100-80GB", zero_stage=3)
