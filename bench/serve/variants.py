"""Replica classes `gpu_bench` deploys in place of gpufleet's to measure one of its choices
(the replica imports them by path, so they live in a module of their own).

``WatchedServer`` is gpufleet's replica with two logs of what stalls its event loop, one JSON line per
event in ``<pid>.jsonl`` under ``stall_log.WATCH_DIR``, which `gpu_bench` sums per level (``pause_summary``):
garbage collections that took 1 ms or more, or were full ones (Ray Serve freezes a replica's startup
heap, RAY_SERVE_FREEZE_GC_ON_STARTUP, so these collect what requests allocate), and the times a 1 ms
heartbeat on the loop woke ``LATE_MS`` or more late (the loop was busy or blocked that long).
Both cost the loop a little (a heartbeat a millisecond): a watched side is a diagnosis.

``InProcessConfigServer`` is gpufleet's replica building vLLM's config in its own process instead of in Ray Serve
LLM's task on the replica's GPU (``config_in_process``): the candidate for the next cut of a GPU replica's start.
"""

from __future__ import annotations

import asyncio
import gc
import os
import time
from typing import Any, TextIO

from ray.llm._internal.serve.core.server.llm_server import LLMServer

from bench.serve.stall_log import WATCH_DIR, write_event
from gpufleet.serve_apps.server import GpufleetServer, timed_engine

HEARTBEAT_S = 0.001
LATE_MS = 5.0


class GcPauseLog:
    """A ``gc.callbacks`` entry that logs the collections worth seeing."""

    def __init__(self, log: TextIO) -> None:
        self.log, self.started = log, 0.0

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self.started = time.perf_counter()
            return
        ms = (time.perf_counter() - self.started) * 1000
        if ms >= 1.0 or info["generation"] == 2:
            write_event(self.log, f"gc gen{info['generation']}", ms)


async def watch_loop(log: TextIO) -> None:
    """Log every heartbeat that wakes ``LATE_MS`` or more after it was due."""
    while True:
        due = time.perf_counter() + HEARTBEAT_S
        await asyncio.sleep(HEARTBEAT_S)
        late = (time.perf_counter() - due) * 1000
        if late >= LATE_MS:
            write_event(log, f"loop late >= {LATE_MS:g} ms", late)


class WatchedServer(GpufleetServer):
    """gpufleet's replica, its collector pauses and event-loop stalls logged."""

    async def __init__(self, *args: Any, **kwargs: Any) -> None:
        await super().__init__(*args, **kwargs)
        WATCH_DIR.mkdir(parents=True, exist_ok=True)
        log = (WATCH_DIR / f"{os.getpid()}.jsonl").open("a", buffering=1)
        gc.callbacks.append(GcPauseLog(log))
        self._watcher = asyncio.get_running_loop().create_task(watch_loop(log))


def config_in_process(base: type) -> type:
    """Ray Serve LLM's engine class building vLLM's config in the replica's own process (the calls Ray makes in
    its task, made here), where Ray runs a task on the replica's GPU for it: a process that imports vLLM and
    initialises CUDA only to build the config (18.8 s of an H100 replica's start, 34.5 s with two replicas
    starting at once, bench/serve/results/h100-ready-breakdown.json). The replica sees its node's GPUs (Ray
    2.58+ leaves ``CUDA_VISIBLE_DEVICES`` alone for actors without GPUs), so vLLM detects the same platform."""
    from ray.llm._internal.serve.engines.vllm import vllm_engine

    class InProcessConfigEngine(base):
        def _prepare_engine_config(self, callback_ctx: Any) -> Any:
            args, config = vllm_engine._get_vllm_engine_config(self.llm_config)
            frontend = vllm_engine.FrontendArgs(**self.llm_config.get_engine_config().frontend_kwargs)
            return args, frontend, config

    return InProcessConfigEngine


class InProcessConfigServer(GpufleetServer):
    """gpufleet's replica with vLLM's config built in its own process (``config_in_process``)."""

    def _get_default_engine_class(self) -> type:
        return timed_engine(config_in_process(LLMServer._get_default_engine_class(self)))
