"""A worker node lost mid-training (a spot reclaim, a dead host) on cluster.yaml's node types: the
autoscaler replaces it and the fine-tune resumes from its last checkpoint in shared storage.

Ray's fake multi-node provider keeps a node it launched in its list until the autoscaler terminates
it, so the loss is simulated as a cloud shows it: the node's processes die at once (SIGKILL), and
autoscaler v2, which reconciles its instances against the nodes the GCS reports dead, terminates the
instance and launches another for the waiting workers.
"""

import json
import os
import signal
import threading
from pathlib import Path

import psutil
import pytest
import ray

from gpufleet.jobs.finetune import TRAIN_ENV, run
from tests.conftest import wait_for_step
from tests.test_cloud_path import fake_cloud, fake_config_from_shipped, fake_gcs_address, job

pytestmark = pytest.mark.slow
FAKE_HEAD_NODE_ID = "fffffffffffffffffffffffffffffffffffffffffffffffffff00000"  # Ray's fake provider's head id
FAKE_HEAD_TYPE = "ray.head.default"  # and its head's node type


@pytest.fixture(scope="module")
def v2_cluster(tmp_path_factory):
    config = fake_config_from_shipped(fake_gcs_address())
    # the same provider loaded as an external module: autoscaler v2 reads the provider's defaults from an
    # example file Ray's wheel does not ship for fake_multinode, and needs none for an external one
    config["provider"].update(type="external", head_node_id=FAKE_HEAD_NODE_ID,
                              module="ray.autoscaler._private.fake_multi_node.node_provider.FakeMultiNodeProvider")
    # and that provider names its head's type so
    config["available_node_types"][FAKE_HEAD_TYPE] = config["available_node_types"].pop(config["head_node_type"])
    config["head_node_type"] = FAKE_HEAD_TYPE
    env = {"RAY_enable_autoscaler_v2": "1", "RAY_CLOUD_INSTANCE_ID": FAKE_HEAD_NODE_ID,
           "RAY_OVERRIDE_NODE_ID_FOR_TESTING": FAKE_HEAD_NODE_ID, "RAY_NODE_TYPE_NAME": FAKE_HEAD_TYPE}
    with fake_cloud(tmp_path_factory.mktemp("replace"), config, env) as d:
        yield d


def kill_node_at_step(metrics: Path, at_step: int, killed: dict) -> None:
    """SIGKILL the raylet of the node where rank 0 trains, and everything it started, once
    ``at_step`` is logged."""
    at = wait_for_step(metrics, at_step, timeout_s=600, poll_s=0.1)
    if at is None:
        return
    rank0 = psutil.Process(int((metrics.parent / "pids" / "rank0.pid").read_text()))
    raylet = next(p for p in rank0.parents() if p.name() == "raylet")
    socket = next(a.split("=", 1)[1] for a in raylet.cmdline() if a.startswith("--raylet_socket_name="))
    node = next(n["NodeID"] for n in ray.nodes() if n["Alive"] and n["RayletSocketName"] == socket)
    victims = [raylet, *raylet.children(recursive=True)]
    for p in victims:
        p.send_signal(signal.SIGKILL)
    killed.update(node=node, at=at, processes=len(victims), nodes_then={n["NodeID"] for n in ray.nodes() if n["Alive"]})


def test_a_lost_worker_node_is_replaced_and_the_job_resumes_from_its_checkpoint(v2_cluster, tmp_path, tiny_model,
                                                                                greeting_data):
    os.environ.update(TRAIN_ENV)
    spec = job(tmp_path, tiny_model, greeting_data, name="replace", max_steps=16, checkpoint_every=4, log_every=1,
               max_failures=3)
    killed: dict = {}
    metrics = tmp_path / "shared" / "replace" / "metrics.jsonl"  # storage: a path every node mounts
    threading.Thread(target=kill_node_at_step, args=(metrics, 6, killed), daemon=True).start()
    done: dict = {}
    runner = threading.Thread(target=lambda: done.update(summary=run(spec)), daemon=True)
    runner.start()
    runner.join(900)  # a lost node that is never replaced leaves the job waiting: fail instead of hanging
    assert "summary" in done, f"no result 15 min after the node loss ({killed})"
    summary = done["summary"]
    rows = [json.loads(x) for x in metrics.read_text().splitlines()]
    steps, resumed = [r["step"] for r in rows], [r["resumed_from"] for r in rows]
    assert killed and killed["at"] >= 6 and summary["metrics"]["step"] == 16
    assert max(resumed) == 4 and steps[-12:] == list(range(5, 17))  # resumed at 4: steps 5-16 once more, none skipped
    alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    assert killed["node"] not in alive and alive - killed["nodes_then"]  # a node launched after the loss
