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


def monitor_reports(timeout_s: float = 5.0) -> list[dict[str, Any]]:
    """Latest samples of every running monitor actor."""
    import ray
    from ray.util.state import list_actors

    handles = [ray.get_actor(a.name, namespace=MONITOR_NAMESPACE)
               for a in list_actors(filters=[("state", "=", "ALIVE")], limit=1000)
               if a.name and a.name.startswith(MONITOR_PREFIX)]
    return ray.get([h.report.remote() for h in handles], timeout=timeout_s) if handles else []
