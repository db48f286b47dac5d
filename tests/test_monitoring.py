"""GPU metrics everywhere: one monitor per GPU node of any cluster, nodes that join later included, and
gpufleet's Grafana dashboard where Ray keeps its own (a real multi-node Ray cluster, a fake NVML)."""

import json
import time
from pathlib import Path

import pytest
import ray
from ray.cluster_utils import Cluster

from gpufleet.cluster.monitor import DASHBOARD_FILE, METRICS, ensure_monitoring, monitor_reports
from tests.test_head import FakeNvml

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster(short_tmp):
    c = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "temp_dir": str(short_tmp / "mon"), "include_dashboard": False})
    c.add_node(num_cpus=1, num_gpus=1)
    c.wait_for_nodes()
    ray.init(address=c.address, logging_level="ERROR")
    yield c
    ray.shutdown()
    c.shutdown()


def monitored_nodes(expected: int, timeout_s: float = 60) -> set[str]:
    deadline, nodes = time.monotonic() + timeout_s, set()
    while time.monotonic() < deadline:
        nodes = {r["node"] for r in monitor_reports() if r["available"]}
        if len(nodes) >= expected:
            break
        time.sleep(0.5)
    return nodes


def test_a_gpu_node_that_joins_later_gets_its_own_monitor(cluster):
    ray.get(ensure_monitoring(interval_s=0.5, backend=FakeNvml(), every_s=0.5).status.remote(), timeout=60)
    first = monitored_nodes(1)
    assert len(first) == 1
    cluster.add_node(num_cpus=1, num_gpus=1)
    both = monitored_nodes(2)
    assert len(both) == 2 and first < both
    cpu_only = {n["NodeID"] for n in ray.nodes() if not n["Resources"].get("GPU")}
    assert not both & cpu_only


def test_the_grafana_dashboard_sits_with_rays_and_charts_every_gauge(cluster):
    status = ray.get(ensure_monitoring().status.remote(), timeout=60)  # the same supervisor, not a second one
    path = Path(status["dashboard"])
    assert path == Path(cluster.head_node.get_session_dir_path()) / "metrics" / "grafana" / "dashboards" / DASHBOARD_FILE
    board = json.loads(path.read_text())
    assert sorted(t["expr"] for p in board["panels"] for t in p["targets"]) == sorted(f"ray_{m}" for m in METRICS)
