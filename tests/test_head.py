"""`gpufleet up` / `down` / `status` against a real local head with token auth, and GPU metrics."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from gpufleet.catalogue.errors import GpufleetError
from gpufleet.cluster.head import (
    HeadConfig,
    free_port,
    head_processes,
    load_state,
    serve_proxy_env,
    start_head,
    stop_head,
)
from gpufleet.cluster.monitor import NO_GPU_MESSAGE, GpuSample, GpuSampler, NvmlBackend
from tests.conftest import has_nvidia_gpu

GPUFLEET = [sys.executable, "-m", "gpufleet.cli"]


class FakeNvml:
    """The hardware seam, faked: two GPUs whose utilisation rises each sample."""

    def __init__(self):
        self.calls = 0

    def init(self):
        pass

    def sample(self):
        self.calls += 1
        return [GpuSample(index=i, name="Fake H100", utilization_percent=10 * i + self.calls,
                          memory_used_bytes=2**30 * (i + 1), memory_total_bytes=80 * 2**30,
                          power_watts=300.0, temperature_celsius=50.0 + i) for i in range(2)]


def cli(home: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "GPUFLEET_HOME": str(home)}
    env.pop("RAY_AUTH_MODE", None)  # `up` and clients must set auth themselves
    p = subprocess.run([*GPUFLEET, *args], env=env, capture_output=True, text=True, timeout=180)
    if check:
        assert p.returncode == 0, p.stderr + p.stdout
    return p


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    port = free_port()
    cli(home, "up", "--num-cpus", "2", "--num-gpus", "1", "--dashboard-port", str(port))
    state = load_state(home)
    yield home, state
    cli(home, "down", check=False)


def test_up_records_the_head_with_a_private_token(head):
    home, state = head
    assert state.dashboard_url.startswith("http://127.0.0.1:")
    assert Path(state.token_path).stat().st_mode & 0o777 == 0o600
    assert head_processes(state.head_id)


def test_job_api_refuses_requests_without_the_token(head):
    _, state = head
    assert requests.get(f"{state.dashboard_url}/api/jobs/", timeout=10).status_code == 401
    assert requests.get(f"{state.dashboard_url}/api/jobs/", headers=state.auth_headers(), timeout=10).ok


def test_status_json_shows_nodes_gpus_and_monitor(head):
    home, _ = head
    st = json.loads(cli(home, "status", "--json").stdout)
    assert [n["gpus_total"] for n in st["nodes"]] == [1.0]
    reports = [r for r in st["gpu_metrics"] if "available" in r]
    assert len(reports) == 1
    if not has_nvidia_gpu():
        assert reports[0]["message"] == NO_GPU_MESSAGE and reports[0]["gpus"] == []


def test_gpu_gauges_reach_prometheus_export(head):
    import ray

    from gpufleet.cluster.head import connect
    from gpufleet.cluster.monitor import MONITOR_NAMESPACE, MONITOR_PREFIX, GpuMonitor

    _, state = head
    connect(state)
    try:
        actor = ray.remote(num_cpus=0)(GpuMonitor).options(
            name=MONITOR_PREFIX + "fake", namespace=MONITOR_NAMESPACE).remote(0.5, FakeNvml())
        assert ray.get(actor.report.remote(), timeout=30)["available"]
        url = f"http://127.0.0.1:{state.metrics_export_port}/metrics"
        deadline, text = time.monotonic() + 60, ""
        while time.monotonic() < deadline and 'gpufleet_gpu_memory_total_bytes{' not in text:
            time.sleep(1)
            text = requests.get(url, timeout=5).text
        lines = [ln for ln in text.splitlines() if ln.startswith("ray_gpufleet_gpu_memory_total_bytes{")
                 or ln.startswith("gpufleet_gpu_memory_total_bytes{")]
        assert len(lines) == 2 and all('gpu="' in ln and 'node="' in ln for ln in lines)
        assert all(float(ln.rsplit(" ", 1)[1]) == 80 * 2**30 for ln in lines)
        ray.kill(actor)
    finally:
        ray.shutdown()


def test_down_stops_only_its_own_head(head, tmp_path):
    home, state = head
    other = start_head(HeadConfig(state_dir=tmp_path / "other", num_cpus=1, dashboard_port=free_port(),
                                  token_auth=False))
    try:
        assert "stopped" in cli(home, "down").stdout
        assert head_processes(state.head_id) == [] and load_state(home) is None
        assert head_processes(other.head_id), "the other cluster must survive `gpufleet down`"
    finally:
        stop_head(tmp_path / "other")
    assert head_processes(other.head_id) == []


def test_down_without_a_head_is_harmless(tmp_path):
    assert "nothing to stop" in cli(tmp_path, "down").stdout


def test_status_without_a_head_says_how_to_start_one(tmp_path):
    p = cli(tmp_path, "status", check=False)
    assert p.returncode == 1 and "run `gpufleet up`" in p.stderr


@pytest.mark.skipif(has_nvidia_gpu(), reason="this machine has an NVIDIA driver")
def test_monitor_without_nvidia_driver_reports_once_and_idles():
    s = GpuSampler(NvmlBackend(), node="n")
    assert not s.available and s.message == NO_GPU_MESSAGE and s.poll() == []


@pytest.mark.gpu
@pytest.mark.skipif(not has_nvidia_gpu(), reason="needs an NVIDIA GPU")
def test_monitor_reads_real_gpus():
    samples = GpuSampler(NvmlBackend(), node="n").poll()
    assert samples and all(s.memory_total_bytes > 2**30 and s.temperature_celsius > 0 for s in samples)


def test_serve_proxy_ray_sets_no_serve_flags():
    assert serve_proxy_env("ray") == {}


def test_serve_proxy_auto_falls_back_to_ray_without_haproxy(monkeypatch):
    monkeypatch.setattr("gpufleet.cluster.head.haproxy_binary", lambda: None)
    assert serve_proxy_env("auto") == {}


def test_serve_proxy_haproxy_without_the_binary_says_how_to_install_it(monkeypatch):
    monkeypatch.setattr("gpufleet.cluster.head.haproxy_binary", lambda: None)
    with pytest.raises(GpufleetError, match="no haproxy binary .* To fix: install it"):
        serve_proxy_env("haproxy")


def test_serve_proxy_haproxy_gets_its_own_stats_and_metrics_ports(monkeypatch):
    monkeypatch.setattr("gpufleet.cluster.head.haproxy_binary", lambda: "/usr/sbin/haproxy")
    env = serve_proxy_env("haproxy")
    assert env["RAY_SERVE_ENABLE_HA_PROXY"] == "1" and env["RAY_SERVE_HAPROXY_BINARY_PATH"] == "/usr/sbin/haproxy"
    # Ray's fixed defaults (8404, 9101) would collide between two heads on one machine
    assert int(env["RAY_SERVE_HAPROXY_STATS_PORT"]) >= 20000 and int(env["RAY_SERVE_HAPROXY_METRICS_PORT"]) >= 20000


def test_corrupt_head_record_is_one_line_with_the_fix(tmp_path):
    (tmp_path / "head.json").write_text("{not json")
    with pytest.raises(GpufleetError, match=r"head.json is not a gpufleet head record .* To fix: remove"):
        load_state(tmp_path)
