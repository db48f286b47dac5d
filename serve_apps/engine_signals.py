"""vLLM's own metrics, read inside a replica from vLLM's Prometheus registry: the scheduling and latency
signals a replica of a model with ``slo:`` reports to Ray Serve's autoscaler
(``gpufleet.serve_apps.slo_policy``), and the values a replica whose engine keeps its own registry
(``engine_metrics`` off) republishes through Ray's metrics every few seconds, so Prometheus reaches them under
either ingress.

Gauges are read as they stand (requests waiting in the engine, KV-cache use); the latency histograms
(time to first token, inter-token latency) are cumulative, so each reading takes the median of what was
observed since the previous one: the latency of the requests of that window, not of the replica's life.
"""

from __future__ import annotations

from typing import Any

from gpufleet.serve_apps.slo_policy import KV_USE, TPOT, TTFT, WAITING

GAUGES = {WAITING: ("vllm:num_requests_waiting", sum), KV_USE: ("vllm:kv_cache_usage_perc", max)}
HISTOGRAMS = {TTFT: "vllm:time_to_first_token_seconds", TPOT: "vllm:inter_token_latency_seconds"}
SLO_SIGNALS_ENV = "GPUFLEET_SLO_SIGNALS"  # set on a replica whose model has slo: it reports these signals
EXPORTED_PREFIX = "gpufleet_"  # vllm:kv_cache_usage_perc -> gpufleet_vllm_kv_cache_usage_perc (ray_ in Prometheus)


def vllm_registry(registry: Any = None) -> Any:
    """``registry``, or prometheus_client's default one, where vLLM's stat logger records."""
    if registry is None:
        from prometheus_client import REGISTRY as registry
    return registry


def engine_metric_values(registry: Any = None) -> dict[str, float]:
    """vLLM's gauges and counters (each summed over its label sets) and its histograms' ``_sum`` and ``_count``
    (rate(sum) / rate(count) is the mean), under names Ray's metrics accept."""
    out: dict[str, float] = {}
    for family in vllm_registry(registry).collect():
        if not family.name.startswith("vllm:"):
            continue
        for s in family.samples:
            kept = (family.type in ("gauge", "counter") and not s.name.endswith("_created")) or (
                family.type == "histogram" and s.name.endswith(("_sum", "_count")))
            if kept:
                name = EXPORTED_PREFIX + s.name.replace(":", "_")
                out[name] = out.get(name, 0.0) + s.value
    return out


def window_median_ms(now: dict[float, float], before: dict[float, float]) -> float:
    """Median (ms) of the observations between two readings of one cumulative histogram ({le: count}),
    interpolated linearly inside its bucket as Prometheus' histogram_quantile does; 0 if none."""
    bounds = sorted(now)
    counts = [now[b] - before.get(b, 0.0) for b in bounds]
    total = counts[-1] if counts else 0.0
    if total <= 0:
        return 0.0
    half, lower, below = total / 2, 0.0, 0.0
    for bound, count in zip(bounds, counts, strict=True):
        if count >= half:
            if bound == float("inf"):
                return lower * 1000
            inside = count - below
            return (lower + (bound - lower) * ((half - below) / inside if inside else 1.0)) * 1000
        lower, below = bound, count
    return lower * 1000


class EngineSignals:
    """Reads the signals from ``registry`` (vLLM's, prometheus_client's default), keeping the histograms'
    last counts for the next window."""

    def __init__(self, registry: Any = None):
        self.registry = vllm_registry(registry)
        self.previous: dict[str, dict[float, float]] = {}

    def read(self) -> dict[str, float]:
        gauges: dict[str, list[float]] = {name: [] for name, _ in GAUGES.values()}
        buckets: dict[str, dict[float, float]] = {name: {} for name in HISTOGRAMS.values()}
        for family in self.registry.collect():
            for s in family.samples:
                if s.name in gauges:
                    gauges[s.name].append(s.value)
                elif s.name.endswith("_bucket") and (base := s.name[: -len("_bucket")]) in buckets:
                    le = float(s.labels["le"])
                    buckets[base][le] = buckets[base].get(le, 0.0) + s.value  # summed over engines
        out = {key: float(reduce(gauges[name])) if gauges[name] else 0.0 for key, (name, reduce) in GAUGES.items()}
        for key, name in HISTOGRAMS.items():
            out[key] = round(window_median_ms(buckets[name], self.previous.get(name, {})), 3)
            self.previous[name] = buckets[name]
        return out
