"""Shared storage: a job whose workers span nodes writes checkpoints and its result to `storage:`, and is
refused without it (a real two-node Ray cluster on this machine; its nodes share this filesystem)."""

import json

import pytest
import ray
from ray.cluster_utils import Cluster

from gpufleet.catalogue.errors import GpufleetError
from gpufleet.jobs.finetune import TRAIN_ENV, run
from tests.conftest import write_spec

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def two_nodes(short_tmp):
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "temp_dir": str(short_tmp / "st"), "include_dashboard": False})
    for _ in range(2):
        cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="ERROR", runtime_env={"env_vars": TRAIN_ENV})
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def spec(tmp_path, tiny_model, data, **over):
    fields = dict(name="shared", model=str(tiny_model), dataset=str(data), task="lora", learning_rate=3e-3,
                  max_steps=4, global_batch=4, seq_len=64, checkpoint_every=2, log_every=2,
                  output_dir=str(tmp_path / "local"), max_failures=0, plan={"workers": 2, "zero_stage": 2})
    return write_spec(tmp_path / "job.yaml", **{**fields, **over})


def test_workers_spanning_nodes_without_storage_are_refused_with_the_fix(two_nodes, tmp_path, tiny_model,
                                                                        greeting_data):
    with pytest.raises(GpufleetError, match="cannot share one node.*node-local.*set storage:"):
        run(spec(tmp_path, tiny_model, greeting_data))
    assert not (tmp_path / "local").exists()


def test_checkpoints_and_result_go_to_shared_storage(two_nodes, tmp_path, tiny_model, greeting_data):
    summary = run(spec(tmp_path, tiny_model, greeting_data, storage=str(tmp_path / "shared")))
    root = tmp_path / "shared" / "shared"
    assert summary["output"] == str(root / "final") and (root / "final" / "adapter_config.json").exists()
    assert {p.name for p in root.iterdir()} >= {"step_000002", "step_000004", "metrics.jsonl", "final"}
    assert [json.loads(x)["step"] for x in (root / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    assert not (tmp_path / "local").exists()  # nothing node-local


def test_a_bucket_uri_gets_checkpoints_and_the_result_through_pyarrow(two_nodes, tmp_path, tiny_model, greeting_data):
    # file:// goes through the same path as s3:// and gs:// (Ray Train's storage_path and pyarrow's
    # filesystems for the upload), only without credentials or a network
    bucket = tmp_path / "bucket"
    summary = run(spec(tmp_path, tiny_model, greeting_data, storage=f"file://{bucket}"))
    root = bucket / "shared"
    assert summary["output"] == f"file://{bucket}/shared/final"
    assert (root / "final" / "adapter_config.json").exists()
    assert [json.loads(x)["step"] for x in (root / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    assert {p.name for p in root.iterdir()} >= {"step_000002", "step_000004"}  # Ray Train's checkpoints
