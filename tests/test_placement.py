"""Placement: plans become Ray placement groups on a real multi-node cluster; infeasible fails fast."""

import time
from pathlib import Path

import pytest
import ray
from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group

from gpufleet.catalogue.errors import PlanError
from gpufleet.catalogue.gpus import get_gpu
from gpufleet.catalogue.model import load_model
from gpufleet.catalogue.placement import NodeCapacity, check_feasible
from gpufleet.catalogue.planner import plan
from gpufleet.cluster.placement import (
    autoscaler_node_types,
    check_placeable,
    record_node_types,
    reserve,
    reserve_placement,
    reserved,
)
from gpufleet.cluster.status import collect_status

H100 = {"GPU": 1.0, "accelerator_type:H100": 0.001, "CPU": 1.0}
FOUR_GPU_NODE = NodeCapacity(name="n", resources={"CPU": 16, "GPU": 4, "accelerator_type:H100": 1})


def nodes_of(pg) -> set[str]:
    return set(placement_group_table(pg)["bundles_to_node_id"].values())


def free_gpus_become(expected: float, timeout_s: float = 10) -> bool:
    """Ray's resource view trails placement changes by a moment: poll until it shows ``expected``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if ray.available_resources().get("GPU", 0) == expected:
            return True
        time.sleep(0.1)
    return False


# ---- pure feasibility ------------------------------------------------------------------------
def test_strict_pack_larger_than_any_node_is_infeasible_with_reason():
    with pytest.raises(PlanError, match=r"needs .*'GPU': 8.0.* on one node; the largest node offers .*'GPU': 4"):
        check_feasible([H100] * 8, "STRICT_PACK", [FOUR_GPU_NODE, FOUR_GPU_NODE])


def test_same_group_spread_over_nodes_is_feasible():
    check_feasible([H100] * 8, "PACK", [FOUR_GPU_NODE, FOUR_GPU_NODE])


def test_wrong_gpu_type_is_infeasible():
    with pytest.raises(PlanError, match="no node has .*accelerator_type:A10G"):
        check_feasible([{"GPU": 1, "accelerator_type:A10G": 0.001}], "PACK", [FOUR_GPU_NODE])


def test_autoscaler_node_type_makes_a_group_feasible():
    eight = NodeCapacity(name="h100x8", resources={"CPU": 192, "GPU": 8, "accelerator_type:H100": 1}, max_count=2)
    check_feasible([H100] * 8, "STRICT_PACK", [FOUR_GPU_NODE], node_types=[eight])


# ---- real cluster ----------------------------------------------------------------------------------
def test_tp4_plan_lands_on_one_node(gpu_cluster):
    p = plan(load_model("qwen2.5-72b"), "serve", get_gpu("H100-80GB"), gpus=4)
    assert p.tensor_parallel == 4 and p.placement_strategy == "STRICT_PACK"
    pg = reserve_placement(p.placement, name="tp4", timeout_s=30)
    try:
        assert len(nodes_of(pg)) == 1
    finally:
        remove_placement_group(pg)


def test_data_parallel_workers_spread_when_asked(gpu_cluster):
    p = plan(load_model("qwen2.5-7b"), "lora", get_gpu("H100-80GB"), gpus=2)
    assert p.data_parallel == 2 and p.placement_strategy == "PACK"
    pg = reserve_placement(p.placement, timeout_s=30, spread=True)
    try:
        assert len(nodes_of(pg)) == 2
    finally:
        remove_placement_group(pg)


def test_data_parallel_workers_pack_by_default(gpu_cluster):
    pg = reserve_placement(plan(load_model("qwen2.5-7b"), "lora", get_gpu("H100-80GB"), gpus=2).placement,
                           timeout_s=30)
    try:
        assert len(nodes_of(pg)) == 1
    finally:
        remove_placement_group(pg)


def test_impossible_group_fails_fast_with_reason(gpu_cluster):
    t0 = time.monotonic()
    with pytest.raises(PlanError, match="on one node; the largest node offers"):
        reserve([H100] * 8, "STRICT_PACK", timeout_s=600)
    assert time.monotonic() - t0 < 5
    assert all(g["state"] != "PENDING" for g in placement_group_table().values())


def test_group_is_removed_when_its_block_ends_even_on_error(gpu_cluster):
    assert free_gpus_become(8)
    with pytest.raises(RuntimeError), reserved([H100] * 4, "STRICT_PACK", timeout_s=30):
        assert free_gpus_become(4)
        raise RuntimeError("job failed")
    assert free_gpus_become(8)


def test_feasible_but_busy_group_times_out_clearly(gpu_cluster):
    with (reserved([H100] * 4, "STRICT_PACK", timeout_s=30), reserved([H100] * 4, "STRICT_PACK", timeout_s=30),
          pytest.raises(PlanError, match=r"was not placed within 2s; free now: \{GPU: 0")):
        reserve([H100] * 4, "STRICT_PACK", timeout_s=2)
    assert all(g["state"] != "PENDING" for g in placement_group_table().values())


def test_status_shows_a_waiting_group_and_what_it_waits_for(gpu_cluster):
    with reserved([H100] * 4, "STRICT_PACK", timeout_s=30), reserved([H100] * 4, "STRICT_PACK", timeout_s=30):
        waiting = placement_group([H100] * 2, strategy="STRICT_PACK", name="waits")
        try:
            time.sleep(1)
            st = collect_status()
            g = next(g for g in st.placement_groups if g.name == "waits")
            assert g.state == "PENDING" and "'GPU': 2.0" in g.waiting_for
            assert sum(n.gpus_total for n in st.nodes) == 8 and sum(n.gpus_free for n in st.nodes) == 0
        finally:
            remove_placement_group(waiting)


# ---- the autoscaler's node types -------------------------------------------------------------------
SHIPPED = Path(__file__).parents[1] / "cluster.yaml"


def test_a_group_only_an_autoscaler_node_type_holds_waits_and_names_the_type(gpu_cluster, monkeypatch):
    monkeypatch.setenv("GPUFLEET_AUTOSCALER_CONFIG", str(SHIPPED))
    tp8 = plan(load_model("llama-3.1-405b"), "serve", "H100", gpus=8, quantization="fp8").placement
    assert tp8.strategy == "STRICT_PACK"  # the live nodes have 4 H100s each: only h100x8 can hold it
    assert "waiting for the autoscaler to launch h100x8" in check_placeable(tp8)
    assert check_placeable(plan(load_model("llama-3.2-1b"), "serve", "H100").placement) is None


def test_the_shipped_cluster_yaml_takes_jobs_for_its_gpu_types_and_refuses_others(gpu_cluster, monkeypatch):
    monkeypatch.setenv("GPUFLEET_AUTOSCALER_CONFIG", str(SHIPPED))
    a10g = plan(load_model("llama-3.2-1b"), "lora", "A10G", gpus=2).placement
    assert "a10gx1 or a10gx4" in check_placeable(a10g)
    with pytest.raises(PlanError, match="can never be placed"):
        check_placeable(plan(load_model("llama-3.2-1b"), "lora", "RTX-4090").placement)


def test_node_types_recorded_by_up_cluster_are_read_back(tmp_path, monkeypatch):
    monkeypatch.delenv("GPUFLEET_AUTOSCALER_CONFIG", raising=False)
    import yaml

    record_node_types(yaml.safe_load(SHIPPED.read_text()), tmp_path)
    types = {t.name: t for t in autoscaler_node_types(tmp_path)}
    assert "head" not in types and types["h100x8"].resources["GPU"] == 8 and types["h100x8"].max_count == 2


def test_a_serve_replica_takes_the_clusters_node_shape_and_its_bundles_are_placed(gpu_cluster):
    """Two nodes of 4 H100s: a replica pinned to 8 GPUs is TP 4 x PP 2 across them, not a TP 8 group no node
    holds, and Ray places exactly those bundles."""
    from gpufleet.cluster.placement import autoscaler_node_types, cluster_nodes
    from gpufleet.serve_apps.app import check_app_fits, sourced_plan, with_node_shapes
    from gpufleet.serve_apps.spec import ModelEntry, ServeSpec

    spec = ServeSpec(ingress="direct", models=[ModelEntry(id="m", source="llama-3.1-70b", gpu="H100",
                                                          tensor_parallel=8)])
    with pytest.raises(PlanError, match="needs .* on one node"):
        check_app_fits(spec, Path("/"))
    shaped = with_node_shapes(spec, [*cluster_nodes(), *autoscaler_node_types()])
    assert shaped.models[0].gpus_per_node == 4
    check_app_fits(shaped, Path("/"))
    p = sourced_plan(shaped.models[0], Path("/"))[1]
    assert (p.tensor_parallel, p.pipeline_parallel, p.nodes) == (4, 2, 2)
    with reserved(p.placement.bundles, p.placement.strategy, timeout_s=30) as pg:
        nodes = set(ray.util.placement_group_table(pg)["bundles_to_node_id"].values())
    assert len(nodes) == 2


def test_replicas_sharing_a_gpu_reserve_a_share_of_it_each(gpu_cluster):
    """Two replicas of a small model on one GPU (replicas_per_gpu=2): each placement group holds half a GPU,
    so the two take one GPU of the cluster between them."""
    p = plan(load_model("llama-3.2-1b"), "serve", get_gpu("H100-80GB"), replicas_per_gpu=2)
    total = ray.cluster_resources()["GPU"]
    assert free_gpus_become(total)  # the module's earlier groups are gone from Ray's view
    with reserved(p.placement.bundles, p.placement.strategy, timeout_s=30), \
            reserved(p.placement.bundles, p.placement.strategy, timeout_s=30):
        assert free_gpus_become(total - 1)
