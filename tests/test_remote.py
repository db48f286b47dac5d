"""The remote path: a head that cannot read the client's directory, driven with `--address` like any remote
cluster.

The head is started by a real `gpufleet up` in its own mount namespace, where a tmpfs hides the client's folder
(its specs and data); loopback networking stays shared. Where this machine cannot make a mount namespace, the
client's folder is moved away right after submitting instead. The model is a Hugging Face repo id, loaded
through `from_pretrained` / vLLM from a pre-populated cache with HF_HUB_OFFLINE=1. Outputs go to storage the
head can reach.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from gpufleet.cluster.head import free_port, head_processes, load_state
from tests.conftest import hf_cache_with, write_greeting_dataset, write_spec

pytestmark = pytest.mark.slow

REPO = "gpufleet-test/tiny-chat"
GPUFLEET = str(Path(sys.executable).with_name("gpufleet"))


def can_hide_a_folder() -> bool:
    return subprocess.run(["unshare", "--mount", "--propagation", "private", "true"],
                          capture_output=True).returncode == 0


@dataclass
class Remote:
    client: Path  # the user's folder: cwd of every client command, invisible to the head
    head_home: Path  # GPUFLEET_HOME of the head's `gpufleet up`
    address: str
    storage: Path
    hidden: bool  # the head runs in a mount namespace where `client` is an empty tmpfs
    env: dict[str, str]  # the client's environment: no head recorded, the HF cache for config.json

    def gpufleet(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        return subprocess.run([GPUFLEET, *args, "--address", self.address], cwd=self.client, env=self.env,
                              capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def remote(tmp_path_factory, tiny_model):
    root = tmp_path_factory.mktemp("remote")
    client, storage, head_home = root / "client", root / "storage", root / "head-home"
    for d in (client, storage):
        d.mkdir()
    hf = hf_cache_with(root / "hf", REPO, tiny_model)
    port = free_port()
    head_env = {**os.environ, "GPUFLEET_HOME": str(head_home), "HF_HUB_CACHE": str(hf), "HF_HUB_OFFLINE": "1"}
    up = [GPUFLEET, "up", "--num-cpus", "6", "--dashboard-port", str(port), "--no-token-auth", "--no-monitor",
          "--serve-proxy", "ray"]
    hidden = can_hide_a_folder()
    if hidden:
        up = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
              'mount -t tmpfs tmpfs "$0" && exec "$@"', str(client), *up]
    p = subprocess.run(up, cwd="/", env=head_env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    client_env = {**os.environ, "GPUFLEET_HOME": str(root / "client-home"), "HF_HUB_CACHE": str(hf),
                  "HF_HUB_OFFLINE": "1", "HF_TOKEN": "hf_not_a_real_token"}
    yield Remote(client, head_home, f"http://127.0.0.1:{port}", storage, hidden, client_env)
    subprocess.run([GPUFLEET, "down"], env=head_env, capture_output=True, timeout=120)


def hide_client_if_needed(remote: Remote) -> None:
    """Without a mount namespace, the client's folder goes away once the job is submitted."""
    if not remote.hidden and remote.client.exists():
        moved = remote.client.with_name("client-moved")
        shutil.move(remote.client, moved)
        remote.client.mkdir()  # the client's commands still run from an (empty) folder


def test_the_head_cannot_see_the_clients_folder(remote):
    if not remote.hidden:
        pytest.skip("no mount namespace here: the folder is moved away after submitting instead")
    (remote.client / "marker").write_text("client only")
    head = load_state(remote.head_home)
    seen = [sorted(p.name for p in Path(f"/proc/{proc.pid}/root{remote.client}").iterdir())
            for proc in head_processes(head.head_id)]
    assert seen and all(names == [] for names in seen)  # an empty tmpfs in each of the head's processes


def test_a_fine_tune_submitted_to_a_remote_head_finishes_with_its_result_in_storage(remote):
    write_greeting_dataset(remote.client / "greetings.jsonl")
    write_spec(remote.client / "job.yaml", name="remote-lora", model=REPO, dataset="greetings.jsonl", task="lora",
               max_steps=4, global_batch=8, seq_len=64, checkpoint_every=2, storage=str(remote.storage),
               lora={"r": 8, "alpha": 16})
    submitted = remote.gpufleet("train", "job.yaml", "--no-follow")
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    sid = submitted.stdout.split("submitted ")[1].split()[0]
    hide_client_if_needed(remote)
    followed = remote.gpufleet("jobs", "follow", sid)
    assert followed.returncode == 0, followed.stdout[-3000:] + followed.stderr[-3000:]
    assert "done: step 4/4" in followed.stdout and f"job {sid}: SUCCEEDED" in followed.stdout
    assert "step 4/4 loss" in followed.stderr, followed.stderr  # the job's own log lines stream under the bar
    final = remote.storage / "remote-lora" / "final"
    assert (final / "adapter_model.safetensors").exists()
    assert json.loads((final / "adapter_config.json").read_text())["r"] == 8

    listed = json.loads(remote.gpufleet("jobs", "list", "--json").stdout)
    assert {"submission_id": sid, "status": "SUCCEEDED", "name": "remote-lora", "kind": "train"}.items() <= next(
        j for j in listed if j["submission_id"] == sid).items()
    logs = remote.gpufleet("jobs", "logs", sid).stdout
    assert "done: step 4/4" in logs and "hf_not_a_real_token" not in logs


def test_a_dataset_named_by_uri_is_read_where_the_job_runs_and_quiet_keeps_only_the_bar(remote):
    data = write_greeting_dataset(remote.storage / "shared-greetings.jsonl")  # in storage the nodes mount
    write_spec(remote.client / "uri.yaml", name="uri-lora", model=REPO, dataset=data.as_uri(), max_steps=2,
               global_batch=8, seq_len=64, storage=str(remote.storage))
    r = remote.gpufleet("train", "uri.yaml", "--quiet")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "done: step 2/2" in r.stdout and "RayTrainWorker" not in r.stdout + r.stderr
    assert (remote.storage / "uri-lora" / "final" / "adapter_model.safetensors").exists()


def test_a_job_can_be_stopped_and_an_unknown_one_is_named_in_one_line(remote):
    write_greeting_dataset(remote.client / "greetings.jsonl")
    write_spec(remote.client / "long.yaml", name="long", model=REPO, dataset="greetings.jsonl", max_steps=100000,
               global_batch=8, seq_len=64, storage=str(remote.storage))
    submitted = remote.gpufleet("train", "long.yaml", "--no-follow")
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    sid = submitted.stdout.split("submitted ")[1].split()[0]
    stopped = remote.gpufleet("jobs", "stop", sid)
    assert stopped.returncode == 0 and f"job {sid}: STOPPED" in stopped.stdout, stopped.stdout + stopped.stderr
    unknown = remote.gpufleet("jobs", "logs", "raysubmit_nope")
    assert unknown.returncode == 1 and len(unknown.stderr.strip().splitlines()) == 1
    assert "raysubmit_nope" in unknown.stderr and "Traceback" not in unknown.stderr


def test_a_model_served_on_a_remote_head_answers_and_its_app_can_be_deleted(remote):
    port = free_port()
    (remote.client / "serve.yaml").write_text(json.dumps({"name": "remote-app", "port": port, "models": [
        {"id": "tiny", "source": REPO, "max_model_len": 256}]}))
    deployed = remote.gpufleet("serve", "serve.yaml")
    assert deployed.returncode == 0, deployed.stdout[-3000:] + deployed.stderr[-3000:]
    r = requests.post(f"http://127.0.0.1:{port}/v1/completions", timeout=120,
                      json={"model": "tiny", "prompt": "def main", "max_tokens": 4, "temperature": 0})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4, r.text
    apps = json.loads(remote.gpufleet("apps", "list", "--json").stdout)
    assert {"name": "remote-app", "status": "RUNNING"}.items() <= next(a for a in apps if a["name"] == "remote-app").items()
    deleted = remote.gpufleet("apps", "delete", "remote-app")
    assert deleted.returncode == 0, deleted.stdout + deleted.stderr
    assert "remote-app" not in {a["name"] for a in json.loads(remote.gpufleet("apps", "list", "--json").stdout)}


def test_status_of_a_remote_head_lists_its_nodes_jobs_and_apps_through_ray_address(remote):
    env = {**remote.env, "RAY_ADDRESS": remote.address}
    r = subprocess.run([GPUFLEET, "status", "--json"], cwd=remote.client, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    st = json.loads(r.stdout)
    assert [n["cpus_total"] for n in st["nodes"]] == [6.0] and st["dashboard_url"] == remote.address
    assert all(j.get("status") for j in st["jobs"]) and "gpu_metrics" in st


def test_a_model_directory_of_the_client_is_refused_for_a_remote_head(remote, tiny_model):
    (remote.client / "local.yaml").write_text(json.dumps({"models": [{"id": "t", "source": str(tiny_model)}]}))
    r = remote.gpufleet("serve", "local.yaml")
    assert r.returncode == 1 and "is a directory on this machine" in r.stderr and "Traceback" not in r.stderr
