"""Ray Serve autoscaling on latency targets: a model's replicas scale on vLLM's own signals (requests
waiting in the engine, KV-cache use, time to first token, time per output token) and on Ray Serve's own
queue, through Ray Serve's custom autoscaling policy API (``AutoscalingConfig.policy``).

Ray wraps the policy with the deployment's bounds and delays (``upscale_delay_s``, ``downscale_delay_s``),
so it only says which way to go, one replica at a time. The replicas report the signals
(``gpufleet.serve_apps.engine_signals``) as custom autoscaling metrics, averaged by Ray over
``look_back_period_s``.

This module is pickled by value into Ray Serve's controller: standard library only.
"""

from __future__ import annotations

from typing import Any

# names of the custom metrics the replicas report (engine_signals.GAUGES and HISTOGRAMS)
WAITING, KV_USE, TTFT, TPOT = "waiting", "kv_cache_usage", "ttft_p50_ms", "tpot_p50_ms"


class SloPolicy:
    """One replica more when any replica misses a target (its TTFT or TPOT above the target, requests
    waiting in its engine or in Ray Serve's queue, its KV cache nearly full); one fewer when every replica
    is comfortably inside them (below ``calm`` x each target, nothing waiting) and the replicas that stay
    would carry the load within their KV-based target of ongoing requests; else as it is."""

    def __init__(self, ttft_p50_ms: float | None = None, tpot_ms: float | None = None, kv_cache_high: float = 0.9,
                 calm: float = 0.5):
        self.targets = {TTFT: ttft_p50_ms, TPOT: tpot_ms}
        self.kv_cache_high, self.calm = kv_cache_high, calm

    def __call__(self, ctx: Any) -> tuple[int, dict[str, Any]]:
        n = ctx.current_num_replicas
        if n == 0:
            return ctx.target_num_replicas, {}
        metrics = ctx.aggregated_metrics or {}

        def worst(name: str) -> float:
            return max(metrics.get(name, {}).values(), default=0.0)

        waiting = sum(metrics.get(WAITING, {}).values()) + (ctx.total_queued_requests or 0)
        missed = [name for name, target in self.targets.items() if target and worst(name) > target]
        if missed or waiting >= 1 or worst(KV_USE) > self.kv_cache_high:
            return n + 1, {"last": "up", "missed": missed, "waiting": waiting}
        calm = all(worst(name) < self.calm * target for name, target in self.targets.items() if target)
        fits_fewer = ctx.total_num_requests <= ctx.config.get_target_ongoing_requests() * (n - 1)
        if n > 1 and calm and worst(KV_USE) < self.calm * self.kv_cache_high and fits_fewer:
            return n - 1, {"last": "down"}
        return n, {}
