"""Per-node GPU metrics: NVML read every few seconds, exported as Ray metrics (Prometheus).

One ``GpuMonitor`` actor runs on each GPU node (``start_monitors``). It samples utilisation,
memory, power and temperature per GPU through ``nvidia-ml-py`` and sets ``gpufleet_gpu_*`` gauges
tagged by node and GPU index, which the Ray dashboard's Prometheus endpoint exports. Without an
NVIDIA driver it says so once and does nothing else: it never crashes a node.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any, Protocol

from pydantic import BaseModel

log = logging.getLogger(__name__)
NO_GPU_MESSAGE = "no NVIDIA GPUs on this node"
METRICS = {  # gauge name -> (sample field, description)
    "gpufleet_gpu_utilization_percent": ("utilization_percent", "GPU compute utilisation, percent"),
    "gpufleet_gpu_memory_used_bytes": ("memory_used_bytes", "GPU memory in use, bytes"),
    "gpufleet_gpu_memory_total_bytes": ("memory_total_bytes", "GPU memory, bytes"),
    "gpufleet_gpu_power_watts": ("power_watts", "GPU board power draw, watts"),
    "gpufleet_gpu_temperature_celsius": ("temperature_celsius", "GPU temperature, degrees Celsius"),
}


class GpuSample(BaseModel):
    index: int
    name: str
    utilization_percent: float
    memory_used_bytes: int
    memory_total_bytes: int
    power_watts: float
    temperature_celsius: float


class GpuBackend(Protocol):
    """The hardware seam: what the monitor needs from NVML."""

    def init(self) -> None: ...
    def sample(self) -> list[GpuSample]: ...


class NvmlBackend:
    """The real backend, through ``nvidia-ml-py`` (import name ``pynvml``)."""

    def init(self) -> None:
        import pynvml

        pynvml.nvmlInit()

    def sample(self) -> list[GpuSample]:
        import pynvml

        out = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            mem = pynvml.nvmlDeviceGetMemoryInfo(h)
            name = pynvml.nvmlDeviceGetName(h)
            out.append(GpuSample(
                index=i, name=name.decode() if isinstance(name, bytes) else name,
                utilization_percent=float(pynvml.nvmlDeviceGetUtilizationRates(h).gpu),
                memory_used_bytes=int(mem.used), memory_total_bytes=int(mem.total),
                power_watts=pynvml.nvmlDeviceGetPowerUsage(h) / 1000.0,
                temperature_celsius=float(pynvml.nvmlDeviceGetTemperature(h, pynvml.NVML_TEMPERATURE_GPU)),
            ))
        return out


class GpuSampler:
    """Samples a backend into gauges. Plain class so it is testable with or without Ray."""

    def __init__(self, backend: GpuBackend, node: str, gauges: dict[str, Any] | None = None):
        self.backend, self.node, self.gauges = backend, node, gauges or {}
        self.available = False
        self.message = ""
        self.latest: list[GpuSample] = []
        try:
            backend.init()
            self.available = True
        except Exception as e:  # NVMLError_LibraryNotFound, DriverNotLoaded, ...: no GPUs here
            self.message = NO_GPU_MESSAGE
            log.info("%s (%s: %s)", NO_GPU_MESSAGE, type(e).__name__, e)

    def poll(self) -> list[GpuSample]:
        if not self.available:
            return []
        try:
            self.latest = self.backend.sample()
        except Exception as e:  # a GPU fell off the bus: report, keep the node alive
            self.message = f"NVML read failed: {type(e).__name__}: {e}"
            log.warning(self.message)
            return self.latest
        for s in self.latest:
            tags = {"node": self.node, "gpu": str(s.index)}
            for metric, (field, _) in METRICS.items():
                if metric in self.gauges:
                    self.gauges[metric].set(getattr(s, field), tags=tags)
        return self.latest


def make_gauges() -> dict[str, Any]:
    from ray.util.metrics import Gauge

    return {name: Gauge(name, description=desc, tag_keys=("node", "gpu")) for name, (_, desc) in METRICS.items()}


class GpuMonitor:
    """Ray actor body: samples every ``interval_s`` seconds in a background thread."""

    def __init__(self, interval_s: float = 5.0, backend: GpuBackend | None = None):
        import ray

        node = ray.get_runtime_context().get_node_id()
        self.sampler = GpuSampler(backend or NvmlBackend(), node=node, gauges=make_gauges())
        self.interval_s = interval_s
        self._stop = threading.Event()
        if self.sampler.available:
            threading.Thread(target=self._loop, daemon=True).start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.sampler.poll()
            self._stop.wait(self.interval_s)

    def report(self) -> dict[str, Any]:
        return {"node": self.sampler.node, "available": self.sampler.available, "message": self.sampler.message,
                "gpus": [s.model_dump() for s in self.sampler.latest], "time": time.time()}


MONITOR_PREFIX = "gpufleet-gpu-monitor-"
MONITOR_NAMESPACE = "gpufleet"


def start_monitors(interval_s: float = 5.0, backend: GpuBackend | None = None) -> list[Any]:
    """One detached monitor actor per alive node that declares GPUs (idempotent)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    actor_cls = ray.remote(num_cpus=0)(GpuMonitor)
    handles = []
    for n in ray.nodes():
        if not n["Alive"] or not n["Resources"].get("GPU"):
            continue
        name = MONITOR_PREFIX + n["NodeID"]
        handles.append(actor_cls.options(
            name=name, namespace=MONITOR_NAMESPACE, lifetime="detached", get_if_exists=True,
            scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False),
        ).remote(interval_s, backend))
    return handles


SUPERVISOR = "gpufleet-gpu-monitor-supervisor"
DASHBOARD_FILE = "gpufleet_gpu_dashboard.json"


class MonitorSupervisor:
    """Ray actor body on the head node: starts a monitor on every GPU node, including nodes that join
    later (it looks again every ``every_s`` seconds), and installs gpufleet's Grafana dashboard beside
    the ones Ray writes into its session directory."""

    def __init__(self, interval_s: float, backend: GpuBackend | None, every_s: float):
        import ray._private.worker as worker

        self.dashboard = install_dashboard(worker.global_worker.node.get_session_dir_path())
        self.args, self.every_s = (interval_s, backend), every_s
        self.watched = len(start_monitors(*self.args))
        threading.Thread(target=self._loop, daemon=True).start()

    def _loop(self) -> None:
        while True:
            time.sleep(self.every_s)
            try:
                self.watched = len(start_monitors(*self.args))
            except Exception as e:  # a node leaving mid-scan: try again next round
                log.warning("gpu monitor supervisor: %s", e)

    def status(self) -> dict[str, Any]:
        return {"monitored_nodes": self.watched, "dashboard": str(self.dashboard)}


def ensure_monitoring(interval_s: float = 5.0, backend: GpuBackend | None = None, every_s: float = 15.0) -> Any:
    """Start (once per cluster) the supervisor that keeps one monitor on each GPU node."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    head = next(n["NodeID"] for n in ray.nodes() if n["Alive"] and "node:__internal_head__" in n["Resources"])
    return ray.remote(num_cpus=0)(MonitorSupervisor).options(
        name=SUPERVISOR, namespace=MONITOR_NAMESPACE, lifetime="detached", get_if_exists=True,
        scheduling_strategy=NodeAffinitySchedulingStrategy(head, soft=False),
    ).remote(interval_s, backend, every_s)


def dashboard_json() -> dict[str, Any]:
    """A Grafana dashboard of the ``gpufleet_gpu_*`` gauges (Ray exports them with its ``ray_`` prefix)."""
    units = {"percent": "percent", "bytes": "bytes", "watts": "watt", "celsius": "celsius"}
    panels = []
    for i, (name, (_, desc)) in enumerate(METRICS.items()):
        unit = units[name.rsplit("_", 1)[1]]
        panels.append({
            "id": i + 1, "type": "timeseries", "title": desc, "datasource": "${datasource}",
            "gridPos": {"h": 8, "w": 12, "x": 12 * (i % 2), "y": 8 * (i // 2)},
            "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
            "targets": [{"expr": f"ray_{name}", "legendFormat": "{{node}} gpu {{gpu}}", "refId": "A"}],
        })
    return {"title": "gpufleet GPUs", "uid": "gpufleet-gpus", "schemaVersion": 27, "version": 1,
            "refresh": "10s", "time": {"from": "now-30m", "to": "now"}, "panels": panels,
            "templating": {"list": [{"name": "datasource", "type": "datasource", "query": "prometheus",
                                     "label": "Data source", "current": {}, "hide": 0}]}}


def install_dashboard(session_dir: str) -> Path:
    """Write the dashboard where Ray writes its own Grafana dashboards for this session."""
    import json

    target = Path(session_dir) / "metrics" / "grafana" / "dashboards" / DASHBOARD_FILE
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(dashboard_json(), indent=1))
    return target


def monitor_reports(timeout_s: float = 5.0) -> list[dict[str, Any]]:
    """Latest samples of the monitor on each alive GPU node (looked up by name: no dashboard needed)."""
    import ray

    handles = []
    for n in ray.nodes():
        if n["Alive"] and n["Resources"].get("GPU"):
            try:
                handles.append(ray.get_actor(MONITOR_PREFIX + n["NodeID"], namespace=MONITOR_NAMESPACE))
            except ValueError:  # not started yet (the supervisor looks again shortly)
                continue
    return ray.get([h.report.remote() for h in handles], timeout=timeout_s) if handles else []
