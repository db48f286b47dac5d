"""Shared fixtures: every test cluster is our own (own temp dir, own ports), stopped by handle."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest

# Tests start clusters without token auth unless they test auth; never inherit a user's settings.
os.environ["RAY_AUTH_MODE"] = "disabled"
os.environ.pop("RAY_ADDRESS", None)
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Ray keeps per-host files (ray_current_cluster, sessions) under RAY_TMPDIR: use our own.
# A Ray worker that unpickles a helper from this module imports it too: it reuses the run's dir.
_OWN_TMP = "GPUFLEET_TEST_TMP" not in os.environ
SESSION_TMP = Path(os.environ.get("GPUFLEET_TEST_TMP") or tempfile.mkdtemp(prefix="gft-", dir="/tmp"))
os.environ["GPUFLEET_TEST_TMP"] = str(SESSION_TMP)
os.environ["RAY_TMPDIR"] = str(SESSION_TMP)
(SESSION_TMP / "ray").mkdir(exist_ok=True)  # Ray writes ray_current_cluster here but does not create it
os.environ["GPUFLEET_RAY_TMP"] = str(SESSION_TMP)


@pytest.fixture(autouse=True, scope="module")
def isolated_environment():
    """Each test module starts from the same environment and Ray auth settings, whatever the
    previous module connected to."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)
    from gpufleet.cluster.head import refresh_ray_auth

    refresh_ray_auth()


def has_nvidia_gpu() -> bool:
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml.nvmlDeviceGetCount() > 0
    except Exception:
        return False


def pytest_sessionfinish(session, exitstatus):
    """Every run removes its temp dir, whichever fixtures it used: runs of a few tests left them."""
    if _OWN_TMP:
        shutil.rmtree(SESSION_TMP, ignore_errors=True)


@pytest.fixture(scope="session")
def short_tmp():
    """A short temp dir: Ray's unix socket paths must stay under 108 characters."""
    return SESSION_TMP


@pytest.fixture(scope="module")
def gpu_cluster(short_tmp):
    """A real 3-node Ray cluster on this machine: a CPU head and two nodes of 4 declared H100s."""
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "temp_dir": str(short_tmp / "mn"), "include_dashboard": False})
    nodes = [cluster.add_node(num_cpus=16, num_gpus=4, resources={"accelerator_type:H100": 1}) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="ERROR")
    yield cluster, nodes
    ray.shutdown()
    cluster.shutdown()


def write_greeting_dataset(path: Path, n: int = 64) -> Path:
    """A small learnable instruction set: a fixed answer format around a name from the prompt."""
    import json
    import random

    rng = random.Random(0)
    names = ["alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi"]
    with path.open("w") as f:
        for _ in range(n):
            who = rng.choice(names)
            f.write(json.dumps({"prompt": f"Greet {who}.", "completion": f"GPUFLEET SAYS: hello {who}!"}) + "\n")
    return path


@pytest.fixture(scope="session")
def tiny_model(short_tmp):
    from gpufleet.jobs.tiny_model import build_tiny_model

    return build_tiny_model(short_tmp / "tiny-model")


@pytest.fixture(scope="session")
def greeting_data(short_tmp):
    return write_greeting_dataset(short_tmp / "greetings.jsonl")


def write_spec(path: Path, **fields) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(fields, sort_keys=False))
    return path


def placed_bundles(group: dict) -> list[dict[str, float]]:
    """The bundles Ray reserved for a placement group (from ``ray.util.placement_group_table``),
    in order, without the zero-valued resources Ray drops anyway."""
    return [{k: v for k, v in b.items() if v} for _, b in sorted(group["bundles"].items())]


def planned_bundles(bundles: list[dict[str, float]]) -> list[dict[str, float]]:
    return [{k: float(v) for k, v in b.items() if v} for b in bundles]


def wait_for_step(metrics: Path, step: int, timeout_s: float, poll_s: float = 0.05) -> int | None:
    """Wait until a run's metrics.jsonl logs ``step`` or later; the step logged, or None at the deadline."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if metrics.exists():
            lines = metrics.read_text().splitlines()
            if lines and (last := json.loads(lines[-1])["step"]) >= step:
                return last
        time.sleep(poll_s)
    return None


def hf_cache_with(cache: Path, repo_id: str, files: dict[str, str | bytes] | Path) -> Path:
    """A Hugging Face hub cache holding one repository (its files given, or those of a model directory),
    laid out as huggingface_hub writes it; returns the cache folder (HF_HUB_CACHE)."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text("0" * 40)
    items = {f.name: f.read_bytes() for f in files.iterdir() if f.is_file()} if isinstance(files, Path) else files
    for name, data in items.items():
        (snap / name).write_bytes(data.encode() if isinstance(data, str) else data)
    return cache


def go_offline(monkeypatch, cache: Path) -> None:
    """The Hugging Face cache at ``cache`` and no network, for this test: huggingface_hub reads both settings
    once, at import, so its constants are patched as well as the environment (without HF_HUB_OFFLINE a miss
    waits on the network)."""
    import huggingface_hub.constants as hf

    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", True)
