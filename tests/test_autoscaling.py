"""Autoscaling for real with Ray's fake multi-node provider: a pending GPU group adds a node,
releasing it removes the node after the idle timeout; impossible groups still fail at once."""

import time

import pytest
import ray
import yaml

from gpufleet.catalogue.errors import PlanError
from gpufleet.catalogue.placement import node_types_from_cluster_config
from gpufleet.cluster.head import HeadConfig, connect, free_port, start_head, stop_head
from gpufleet.cluster.placement import reserve

A10G = {"GPU": 1.0, "accelerator_type:A10G": 0.001, "CPU": 1.0}


def fake_cluster_config(gcs_address: str) -> dict:
    empty: list = []
    return {
        "cluster_name": "gpufleet-fake", "max_workers": 2, "upscaling_speed": 1.0, "idle_timeout_minutes": 0.1,
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True, "gcs_address": gcs_address},
        "auth": {"ssh_user": "ubuntu"},
        "head_node_type": "ray.head.default",
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 2}, "node_config": {}, "max_workers": 0},
            "a10gx2": {"resources": {"CPU": 2, "GPU": 2, "accelerator_type:A10G": 1}, "node_config": {},
                       "min_workers": 0, "max_workers": 2},
        },
        "file_mounts": {}, "cluster_synced_files": empty, "file_mounts_sync_continuously": False,
        "rsync_exclude": empty, "rsync_filter": empty, "initialization_commands": empty, "setup_commands": empty,
        "head_setup_commands": empty, "worker_setup_commands": empty, "head_start_ray_commands": empty,
        "worker_start_ray_commands": empty,
    }


def gpu_nodes() -> int:
    return sum(1 for n in ray.nodes() if n["Alive"] and n["Resources"].get("GPU"))


@pytest.fixture(scope="module")
def autoscaling_head(tmp_path_factory):
    from ray._private.services import get_node_ip_address

    d = tmp_path_factory.mktemp("auto")
    port = free_port()
    config = fake_cluster_config(f"{get_node_ip_address()}:{port}")
    (d / "fake.yaml").write_text(yaml.safe_dump(config))
    state = start_head(HeadConfig(
        state_dir=d, port=port, num_cpus=2, dashboard_port=free_port(), token_auth=False,
        autoscaling_config=d / "fake.yaml", env={"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"}))
    connect(state)
    yield node_types_from_cluster_config(config)
    ray.shutdown()
    stop_head(d)


def test_pending_gpu_group_adds_a_node_and_release_removes_it(autoscaling_head):
    assert gpu_nodes() == 0
    pg = reserve([A10G] * 2, "STRICT_PACK", timeout_s=90, node_types=autoscaling_head)
    assert gpu_nodes() == 1
    ray.util.remove_placement_group(pg)
    deadline = time.monotonic() + 90
    while gpu_nodes() and time.monotonic() < deadline:
        time.sleep(1)
    assert gpu_nodes() == 0


def test_group_no_node_type_can_hold_fails_at_once(autoscaling_head):
    t0 = time.monotonic()
    with pytest.raises(PlanError, match="on one node; the largest node offers"):
        reserve([A10G] * 4, "STRICT_PACK", timeout_s=600, node_types=autoscaling_head)
    assert time.monotonic() - t0 < 5
