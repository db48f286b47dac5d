"""GPU table: dtype choice by compute capability, lookup."""

import pytest

from gpufleet.catalogue.errors import SpecError
from gpufleet.catalogue.gpus import GPU_TYPES, get_gpu


@pytest.mark.parametrize("name", ["P4", "T4", "V100-32GB"])
def test_pre_ampere_gpus_train_in_fp16(name):
    assert get_gpu(name).train_dtype == "float16"


@pytest.mark.parametrize("name", ["A10G", "A100-40GB", "L4", "H100-80GB", "H200", "RTX-4090", "L40S"])
def test_ampere_and_newer_train_in_bf16(name):
    assert get_gpu(name).train_dtype == "bfloat16"


def test_table_covers_the_required_gpus():
    required = {"H200", "H100-80GB", "A100-80GB", "A100-40GB", "L40S", "L4", "A10G", "T4", "V100-32GB", "P4", "RTX-4090"}
    assert required <= set(GPU_TYPES)


def test_lookup_by_alias_is_case_insensitive():
    assert get_gpu("h100").name == "H100-80GB"


def test_unknown_gpu_lists_known_ones():
    with pytest.raises(SpecError, match="unknown GPU type 'K9000'.*H100-80GB"):
        get_gpu("K9000")


def test_the_gpus_users_ask_about_are_in_the_table():
    assert {"B200", "L40", "RTX-3090"} <= set(GPU_TYPES)
    assert get_gpu("3090").name == "RTX-3090" and get_gpu("B200").supports_fp8


def test_an_amd_gpu_is_refused_as_unsupported_by_this_build_in_one_line():
    with pytest.raises(SpecError, match=r"^MI300X runs on AMD's ROCm, which this build .* does not support\. To fix"):
        get_gpu("MI300X")


@pytest.mark.parametrize("name", ["P4", "M60"])
def test_vllm_is_not_planned_below_compute_capability_7(name):
    from gpufleet.catalogue.errors import PlanError
    from gpufleet.catalogue.model import load_model
    from gpufleet.catalogue.planner import plan

    with pytest.raises(PlanError, match=rf"vLLM's CUDA build does not run on {name} \(compute capability "
                                        r"\d\.\d; it needs 7\.0\+\)\. To fix: plan --task generate"):
        plan(load_model("llama-3.2-1b"), "serve", name)
    assert plan(load_model("llama-3.2-1b"), "generate", name).gpus >= 1


def test_training_below_compute_capability_7_plans_without_torch_compile():
    from gpufleet.catalogue.model import load_model
    from gpufleet.catalogue.planner import plan

    p4, t4 = (plan(load_model("llama-3.2-1b"), "lora", g) for g in ("P4", "T4"))
    assert not p4.compile and any("torch.compile off" in n for n in p4.notes)
    assert t4.compile and not any("torch.compile off" in n for n in t4.notes)


def test_a100_sizes_are_pinned_by_rays_size_labels_which_nodes_declare():
    from gpufleet.catalogue.gpus import GIB, declared_labels

    assert (get_gpu("A100-80GB").ray_accelerator_type, get_gpu("A100-40GB").ray_accelerator_type) == (
        "A100-80G", "A100-40G")
    assert declared_labels("NVIDIA A100-SXM4-80GB", 80 * GIB) == {"accelerator_type:A100-80G": 1.0}
    assert declared_labels("NVIDIA A100-PCIE-40GB", 40 * GIB) == {"accelerator_type:A100-40G": 1.0}
    assert declared_labels("NVIDIA H100 80GB HBM3", 80 * GIB) == {}  # Ray labels it H100 itself


def test_an_a100_40gb_plan_is_not_placed_on_the_shipped_80gb_nodes():
    from pathlib import Path

    import yaml

    from gpufleet.catalogue.errors import PlanError
    from gpufleet.catalogue.model import load_model
    from gpufleet.catalogue.placement import check_feasible, node_types_from_cluster_config
    from gpufleet.catalogue.planner import plan

    types = node_types_from_cluster_config(yaml.safe_load((Path(__file__).parents[1] / "cluster.yaml").read_text()))
    big, small = (plan(load_model("llama-3.1-8b"), "serve", g) for g in ("A100-80GB", "A100-40GB"))
    check_feasible(big.placement.bundles, big.placement.strategy, [], types)
    with pytest.raises(PlanError, match="can never be placed: no node has .*A100-40G"):
        check_feasible(small.placement.bundles, small.placement.strategy, [], types)
