"""The shipped cluster.yaml, end to end on one machine: Ray's fake multi-node provider with cluster.yaml's
node types (a head with no CPUs for work, every worker type at min_workers 0). A fine-tune brings up a
node, trains on it and finishes, its checkpoints and result in shared storage; idle nodes go away; a
served model brings up a node again and answers through the OpenAI client.

Every fake node runs on this one machine, so the head serves HTTP with Ray's own proxy (HAProxy mode
would start one HAProxy per node, all on the same port)."""

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import ray
import yaml

from gpufleet.cluster.head import HeadConfig, connect, free_port, start_head, stop_head
from gpufleet.jobs.finetune import TRAIN_ENV, run
from tests.conftest import write_spec

pytestmark = pytest.mark.slow
SHIPPED = Path(__file__).parents[1] / "cluster.yaml"


def fake_config_from_shipped(gcs_address: str) -> dict:
    """cluster.yaml's head and worker types (resources, min/max workers) on the fake provider."""
    shipped = yaml.safe_load(SHIPPED.read_text())
    # Ray's fake provider hands every declared resource to RayParams, which refuses `memory` (a real node
    # takes it from RAY_OVERRIDE_RESOURCES): the fake nodes leave it out, and plan checks treat it as unknown.
    types = {name: {"resources": {k: v for k, v in t["resources"].items() if k != "memory"}, "node_config": {}, "min_workers": t.get("min_workers", 0),
                    "max_workers": t.get("max_workers", 0)}
             for name, t in shipped["available_node_types"].items()}
    empty: list = []
    return {
        "cluster_name": "gpufleet-shipped", "max_workers": shipped["max_workers"], "upscaling_speed": 1.0,
        "idle_timeout_minutes": 0.2,
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True, "gcs_address": gcs_address},
        "auth": {"ssh_user": "ubuntu"}, "head_node_type": shipped["head_node_type"], "available_node_types": types,
        "file_mounts": {}, "cluster_synced_files": empty, "file_mounts_sync_continuously": False,
        "rsync_exclude": empty, "rsync_filter": empty, "initialization_commands": empty, "setup_commands": empty,
        "head_setup_commands": empty, "worker_setup_commands": empty, "head_start_ray_commands": empty,
        "worker_start_ray_commands": empty,
    }


@contextmanager
def fake_cloud(d: Path, config: dict, env: dict | None = None) -> Iterator[Path]:
    """A head (no CPUs for work, Ray's own HTTP proxy) whose autoscaler runs ``config`` on the fake
    provider; plan checks read the same node types; connected while the block runs."""
    (d / "fake.yaml").write_text(yaml.safe_dump(config))
    state = start_head(HeadConfig(
        state_dir=d, port=int(config["provider"]["gcs_address"].rsplit(":", 1)[1]), num_cpus=0,
        dashboard_port=free_port(), token_auth=False, serve_proxy="ray", autoscaling_config=d / "fake.yaml",
        env={"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1", **(env or {})}))
    os.environ["GPUFLEET_AUTOSCALER_CONFIG"] = str(d / "fake.yaml")
    connect(state)
    try:
        yield d
    finally:
        os.environ.pop("GPUFLEET_AUTOSCALER_CONFIG", None)
        ray.shutdown()
        stop_head(d)


def fake_gcs_address() -> str:
    from ray._private.services import get_node_ip_address

    return f"{get_node_ip_address()}:{free_port()}"


@pytest.fixture(scope="module")
def shipped_cluster(tmp_path_factory):
    with fake_cloud(tmp_path_factory.mktemp("shipped"), fake_config_from_shipped(fake_gcs_address())) as d:
        yield d


def worker_nodes() -> list[dict]:
    return [n for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU")]


def job(tmp_path, tiny_model, data, **over) -> Path:
    fields = dict(name="cloud", model=str(tiny_model), dataset=str(data), task="lora", learning_rate=3e-3,
                  max_steps=12, global_batch=4, seq_len=64, checkpoint_every=4, log_every=4,
                  output_dir=str(tmp_path / "local"), storage=str(tmp_path / "shared"), max_failures=2,
                  plan={"workers": 2, "zero_stage": 2})
    return write_spec(tmp_path / "job.yaml", **{**fields, **over})


def test_a_finetune_on_the_shipped_cluster_brings_up_a_node_and_finishes(shipped_cluster, tmp_path, tiny_model,
                                                                         greeting_data):
    assert worker_nodes() == []  # the head offers no CPU: nothing can run until the autoscaler adds a node
    os.environ.update(TRAIN_ENV)
    summary = run(job(tmp_path, tiny_model, greeting_data))
    assert summary["metrics"]["step"] == 12 and worker_nodes()
    assert (tmp_path / "shared" / "cloud" / "final" / "adapter_config.json").exists()


def test_idle_worker_nodes_go_away(shipped_cluster):
    deadline = time.monotonic() + 180  # cluster idle_timeout_minutes 0.2 here
    while worker_nodes() and time.monotonic() < deadline:
        time.sleep(2)
    assert worker_nodes() == []


def test_a_model_served_on_the_shipped_cluster_brings_up_a_node_and_answers(shipped_cluster, tmp_path, tiny_model):
    from openai import OpenAI
    from ray import serve

    from gpufleet.serve_apps.app import deploy
    from gpufleet.serve_apps.spec import ServeSpec

    while worker_nodes():  # start from a cluster with no worker (the test above waits for that)
        time.sleep(2)
    spec = ServeSpec(name="cloud", port=free_port(), models=[{"id": "tiny", "source": str(tiny_model), "max_model_len": 256}])
    waits: list[str] = []
    try:
        url = deploy(spec, tmp_path, report=waits.append, stall_s=15, timeout_s=900)
        answer = OpenAI(base_url=url, api_key="none", max_retries=0, timeout=120).completions.create(
            model="tiny", prompt="def main", max_tokens=4, temperature=0)
        assert answer.usage.completion_tokens == 4 and worker_nodes()
    finally:
        serve.shutdown()
