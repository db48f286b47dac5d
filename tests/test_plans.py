"""Typed plans: one request type, one plan type per task family, and what each carries."""

import json

import pytest
from click.testing import CliRunner

from catalogue.errors import PlanError, SpecError
from catalogue.model import builtin_models, load_model, spec_from_config
from catalogue.placement import NodeCapacity, check_feasible
from catalogue.planner import plan
from catalogue.plans import InferPlan, ServePlan, TrainPlan
from gpufleet.cli import main
from jobs.finetune import scaling_kwargs
from jobs.layout import resolve_layout
from jobs.spec import JobSpec

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
                               "max_num_seqs": p.max_ongoing_requests}


def test_cpu_serving_is_a_plan_with_cpu_bundles_and_kv_space():
    p = plan(load_model("qwen2.5-0.5b"), "serve", "CPU", gpus=2, seq_len=1024, cpu_kv_cache_gib=2)
    assert p.placement.bundles == [{"CPU": 1.0}, {"CPU": 1.0}] and p.placement.strategy == "STRICT_PACK"
    assert p.engine_kwargs["dtype"] == "float32" and p.engine_kwargs["enforce_eager"] is True
    assert p.engine_env == {"VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_CPU_OMP_THREADS_BIND": "0|1"}


def test_cli_serve_plan_json_shows_engine_kwargs_for_cpu():
    r = CliRunner().invoke(main, ["plan", "qwen2.5-0.5b", "--task", "serve", "--gpu", "CPU", "--seq", "512", "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    assert d["engine_kwargs"]["max_model_len"] == 512 and d["placement"]["bundles"] == [{"CPU": 1.0}]


def test_training_on_cpu_has_no_plan():
    with pytest.raises(PlanError, match="task 'lora' has no CPU plan"):
        plan(load_model("qwen2.5-0.5b"), "lora", "CPU")


def test_printed_train_plan_is_what_ray_train_reserves():
    job = JobSpec(model="m", dataset="d", task="full", max_steps=1, gpu="H100-80GB", global_batch=32, seq_len=2048)
    p = plan(load_model("llama-3.2-1b"), "full", "H100-80GB", seq_len=2048, batch=32)
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
        plan(load_model("llama-3.1-8b"), "full", "H100", gpus=4, batch=10)


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
    p = plan(load_model("llama-3.1-8b"), "full", "H100")
    assert p.offload_optimizer and p.host_bytes_per_gpu == p.memory.cpu_offload > 100 * 2**30
    assert all(b["memory"] == p.host_bytes_per_gpu for b in p.placement.bundles)


def test_offload_plan_that_no_node_can_hold_in_host_memory_is_refused():
    p = plan(load_model("llama-3.1-8b"), "full", "H100")
    small = NodeCapacity(name="n", resources={"CPU": 32, "GPU": 8, "accelerator_type:H100": 1, "memory": 64 * 2**30})
    with pytest.raises(PlanError, match="can never be placed: no node has .*'memory'"):
        check_feasible(p.placement.bundles, p.placement.strategy, [small])
    check_feasible(p.placement.bundles, p.placement.strategy, [small.model_copy(update={"resources": {
        **small.resources, "memory": 512 * 2**30}})])
