"""A replica's start: where the time goes, and no step that does nothing.

Ray Serve LLM starts every replica by running a task on each node of its placement group to "download"
the model; for a model that is not in a bucket (a local directory, a Hub id read from the node's Hugging
Face cache) that task only returns the id it was given, yet it costs a fresh worker process and its
imports (7 s on a 2-core CPU node). ``ReplicaStartup`` is the Ray Serve LLM callback (LLMConfig's
``callback_config``) that skips the step for such models and records when node initialisation ran;
``StartupClock`` turns the replica's timestamps into the breakdown it logs and exports.
``spread_tcpstore_port`` keeps replicas that start together on one node off each other's port.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

from ray.llm._internal.common.callbacks.base import CallbackBase
from ray.llm._internal.common.utils.cloud_utils import is_remote_path

from gpufleet.cluster.head import free_port


@dataclass
class StartupClock:
    """Wall-clock marks (``time.time()``) of one replica's start, in the order they happen."""

    process_started: float
    init_entered: float
    marks: dict[str, float] = field(default_factory=dict)

    def mark(self, name: str) -> None:
        self.marks[name] = time.time()

    def phases(self) -> dict[str, float]:
        """Seconds per phase: process (worker start and imports, up to the replica's __init__), compile_cache
        (with the spec's storage: the compile cache restored on a fresh node), model_files (Ray Serve LLM's node
        initialisation), engine_config (vLLM's config, built by Ray Serve LLM in a GPU task of its own on GPUs),
        engine (vLLM's engine process and worker: weights, compile, graphs, KV cache), http_app (the replica's
        OpenAI app, direct ingress only)."""
        m = self.marks
        node_start, node_end = m.get("node_init_started", self.init_entered), m.get("node_init_done")
        config_end, engine_end = m.get("engine_config_built"), m.get("engine_started")
        out = {"process": self.init_entered - self.process_started}
        if "compile_cache_restored" in m:  # storage's compile cache, before the replica's other steps
            out["compile_cache"] = m["compile_cache_restored"] - self.init_entered
        if node_end is not None:
            out["model_files"] = node_end - node_start
        engine_start = node_end if node_end is not None else self.init_entered
        if config_end is not None:
            out["engine_config"] = config_end - engine_start
            engine_start = config_end
        if engine_end is not None:
            out["engine"] = engine_end - engine_start
        if "http_app_built" in m and engine_end is not None:
            out["http_app"] = m["http_app_built"] - engine_end
        return {k: round(max(0.0, v), 2) for k, v in out.items()}

    def total(self) -> float:
        return round(max(self.marks.values(), default=self.init_entered) - self.process_started, 2)

    def summary(self, skipped_download: bool) -> str:
        parts = [f"{k.replace('_', ' ')} {v:.1f} s" for k, v in self.phases().items()]
        note = " (no download: not a bucket model)" if skipped_download else ""
        return f"replica ready in {self.total():.1f} s: " + ", ".join(parts) + note


def process_start_time() -> float:
    """When this worker process started (the replica's actor runs in a process of its own)."""
    try:
        import psutil
    except ImportError:  # a node image without psutil: /proc/PID is made when the process is
        return os.stat(f"/proc/{os.getpid()}").st_ctime
    return psutil.Process(os.getpid()).create_time()


DP_MASTER_PORT_ENV = "VLLM_DP_MASTER_PORT"


def spread_tcpstore_port(task_env: dict[str, str]) -> None:
    """Give this replica's engine a port window of its own for its ``torch.distributed`` store.

    vLLM 0.26's Ray executor (PR #45960, undone by PR #50969 in later versions) searches that port upward from
    ``VLLM_DP_MASTER_PORT + 100``: 100 for every engine that is not data parallel. Two replicas starting at once
    on one node (two on a shared GPU, or two models on one 8-GPU node) both find 100 free, and the second to
    listen fails with ``EADDRINUSE``. Here the search starts at a port that is free now (``free_port``, above
    Ray's worker ports), picked at random for every replica. vLLM reads the variable where it builds its config:
    on GPUs that is Ray Serve LLM's task on the replica's GPU (``task_env``, the callback's runtime env), on CPUs
    this process. Without data parallelism vLLM reads it for nothing else, and it is not part of vLLM's
    compile-cache key.
    """
    if DP_MASTER_PORT_ENV in os.environ or DP_MASTER_PORT_ENV in task_env:  # the user's own (data-parallel) setting
        return
    os.environ[DP_MASTER_PORT_ENV] = task_env[DP_MASTER_PORT_ENV] = str(free_port() - 100)


class ReplicaStartup(CallbackBase):
    """Skips Ray Serve LLM's per-node download task where there is nothing to download, and marks
    node initialisation on the replica's ``StartupClock`` (``custom_data['clock']``, set by the server)."""

    async def on_before_node_init(self) -> None:
        engine = self.llm_config.get_engine_config()
        if engine.mirror_config is None and not is_remote_path(engine.actual_hf_model_id):
            # The task would return this same id: vLLM reads the directory or the Hub cache itself.
            self.ctx.run_init_node = False
            self.ctx.custom_data["skipped_download"] = True
        self._mark("node_init_started")

    async def on_after_node_init(self) -> None:
        self._mark("node_init_done")

    def _mark(self, name: str) -> None:
        clock = self.ctx.custom_data.get("clock")
        if clock is not None:
            clock.mark(name)
