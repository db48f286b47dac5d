"""Autoscaling on latency targets, without starting anything: the policy Ray Serve's controller runs, the
signals a replica reads from vLLM's registry, and what a spec's `slo:` turns into."""

from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from pydantic import ValidationError
from ray.serve._private.common import DeploymentID, ReplicaID
from ray.serve.config import AutoscalingConfig, AutoscalingContext

from gpufleet.serve_apps.app import SLO_POLICY, llm_config_dict
from gpufleet.serve_apps.engine_signals import SLO_SIGNALS_ENV, EngineSignals, engine_metric_values
from gpufleet.serve_apps.slo_policy import KV_USE, TTFT, WAITING, SloPolicy
from gpufleet.serve_apps.spec import ModelEntry, ServeSpec

DEPLOYMENT = DeploymentID(name="m", app_name="a")


def context(replicas: int, metrics: dict, ongoing: float = 0.0, queued: float = 0.0) -> AutoscalingContext:
    ids = [ReplicaID(unique_id=f"r{i}", deployment_id=DEPLOYMENT) for i in range(replicas)]
    return AutoscalingContext(
        deployment_id=DEPLOYMENT, deployment_name="m", app_name="a", current_num_replicas=replicas,
        target_num_replicas=replicas, running_replicas=ids, total_num_requests=ongoing, total_queued_requests=queued,
        aggregated_metrics={name: dict(zip(ids, values, strict=True)) for name, values in metrics.items()},
        raw_metrics=None, capacity_adjusted_min_replicas=1, capacity_adjusted_max_replicas=4, policy_state={},
        last_scale_up_time=None, last_scale_down_time=None, current_time=0.0,
        config=AutoscalingConfig(min_replicas=1, max_replicas=4, target_ongoing_requests=8))


def test_a_replica_whose_ttft_misses_the_target_adds_one():
    decision, state = SloPolicy(ttft_p50_ms=200)(context(2, {TTFT: [120, 260]}, ongoing=10))
    assert decision == 3 and state["missed"] == [TTFT]


def test_requests_waiting_in_an_engine_or_in_serves_queue_add_one_before_a_target_is_missed():
    policy = SloPolicy(ttft_p50_ms=200)
    assert policy(context(1, {TTFT: [50], WAITING: [2]}))[0] == 2
    assert policy(context(1, {TTFT: [50], WAITING: [0]}, queued=3))[0] == 2


def test_a_nearly_full_kv_cache_adds_one():
    assert SloPolicy(tpot_ms=50)(context(1, {KV_USE: [0.95]}))[0] == 2


def test_calm_replicas_whose_load_fits_fewer_remove_one_and_busy_ones_stay():
    policy = SloPolicy(ttft_p50_ms=200)
    assert policy(context(3, {TTFT: [40, 60, 30], KV_USE: [0.1] * 3}, ongoing=10))[0] == 2
    assert policy(context(3, {TTFT: [40, 60, 30], KV_USE: [0.1] * 3}, ongoing=20))[0] == 3  # 2 x 8 < 20
    assert policy(context(3, {TTFT: [40, 150, 30], KV_USE: [0.1] * 3}, ongoing=10))[0] == 3  # not calm


def test_engine_signals_take_the_median_of_each_window_not_of_the_replicas_life():
    registry = CollectorRegistry()
    ttft = Histogram("vllm:time_to_first_token_seconds", "", buckets=(0.1, 0.2, 0.4, 0.8), registry=registry)
    Gauge("vllm:num_requests_waiting", "", registry=registry).set(3)
    Gauge("vllm:kv_cache_usage_perc", "", registry=registry).set(0.25)
    signals = EngineSignals(registry)
    for _ in range(10):
        ttft.observe(0.15)
    first = signals.read()
    assert 100 < first[TTFT] <= 200 and first[WAITING] == 3 and first[KV_USE] == 0.25
    for _ in range(10):
        ttft.observe(0.6)
    assert 400 < signals.read()[TTFT] <= 800  # the slow window alone, not a median with the fast one
    assert signals.read()[TTFT] == 0  # nothing observed since


def test_a_replica_republishes_vllms_gauges_counters_and_histogram_sums_under_names_ray_accepts():
    registry = CollectorRegistry()
    running = Gauge("vllm:num_requests_running", "", ["engine"], registry=registry)
    running.labels(engine="0").set(2)
    running.labels(engine="1").set(3)
    Counter("vllm:generation_tokens", "", registry=registry).inc(40)
    Histogram("vllm:e2e_request_latency_seconds", "", registry=registry).observe(0.5)
    Gauge("process_open_fds", "", registry=registry).set(9)  # not vLLM's: left to whoever owns it
    assert engine_metric_values(registry) == {
        "gpufleet_vllm_num_requests_running": 5, "gpufleet_vllm_generation_tokens_total": 40,
        "gpufleet_vllm_e2e_request_latency_seconds_sum": 0.5, "gpufleet_vllm_e2e_request_latency_seconds_count": 1}


def test_a_model_with_latency_targets_gets_the_slo_policy_and_its_replicas_report_vllms_signals(tmp_path):
    entry = ModelEntry(id="m", source="llama-3.2-1b", gpu="H100", replicas={"min": 1, "max": 3},
                       slo={"ttft_p50_ms": 250, "scale_down_after_s": 30})
    conf = llm_config_dict(entry, tmp_path)
    scaling = conf["deployment_config"]["autoscaling_config"]
    assert scaling["policy"] == {"policy_function": SLO_POLICY, "policy_kwargs": {"ttft_p50_ms": 250, "tpot_ms": None}}
    assert scaling["downscale_delay_s"] == 30 and conf["deployment_config"]["graceful_shutdown_timeout_s"] >= 60
    assert conf["log_engine_metrics"] is False and conf["runtime_env"]["env_vars"][SLO_SIGNALS_ENV] == "1"
    AutoscalingConfig(**scaling)  # Ray Serve takes it as it is


def test_latency_targets_without_room_to_scale_or_with_ray_exported_metrics_are_refused_in_one_line():
    with pytest.raises(ValidationError, match=r"replicas.min = replicas.max = 1\. To fix: raise replicas.max"):
        ServeSpec(models=[ModelEntry(id="m", source="s", slo={"ttft_p50_ms": 200})])
    with pytest.raises(ValidationError, match="engine_metrics: true replaces.*drop engine_metrics"):
        ServeSpec(models=[ModelEntry(id="m", source="s", slo={"tpot_ms": 40}, engine_metrics=True,
                                     replicas={"max": 2})])
    with pytest.raises(ValidationError, match="slo names no target"):
        ModelEntry(id="m", source="s", slo={})


def test_the_policy_module_imports_nothing_the_serve_controller_may_lack():
    source = (Path(__file__).parents[1] / "serve_apps" / "slo_policy.py").read_text()
    imports = [line for line in source.splitlines() if line.startswith(("import ", "from "))]
    assert imports == ["from __future__ import annotations", "from typing import Any"]


def test_ray_serves_own_policy_machinery_runs_the_emitted_policy_where_request_counts_alone_would_not_scale(
        tmp_path):
    """The emitted autoscaling config, resolved and wrapped the way Ray Serve's controller does: one ongoing
    request against a target of hundreds would keep one replica under Ray's default policy; a missed TTFT adds
    one, within the spec's bounds."""
    from ray.serve._private.autoscaling_state import _resolve_policy_callable
    from ray.serve.autoscaling_policy import (
        _apply_autoscaling_config,
        replica_queue_length_autoscaling_policy,
    )

    entry = ModelEntry(id="m", source="llama-3.2-1b", gpu="H100", replicas={"min": 1, "max": 2},
                       slo={"ttft_p50_ms": 200, "scale_up_after_s": 0})
    config = AutoscalingConfig(**llm_config_dict(entry, tmp_path)["deployment_config"]["autoscaling_config"])
    policy = _apply_autoscaling_config(_resolve_policy_callable(config.policy))
    ctx = context(1, {TTFT: [450.0], KV_USE: [0.05]}, ongoing=1)
    ctx.config = config
    assert policy(ctx)[0] == 2
    assert _apply_autoscaling_config(replica_queue_length_autoscaling_policy)(ctx)[0] == 1
