"""Replica classes `gpu_bench` deploys in place of gpufleet's to measure one of its choices
(the replica imports them by path, so they live in a module of their own).

``GcLoggedServer`` logs the replica's garbage-collector pauses (Ray Serve freezes a replica's startup
heap, RAY_SERVE_FREEZE_GC_ON_STARTUP, so what is left are collections of what requests allocate): one JSON line per collection that took 1 ms or
more, or was a full one, in ``gc-<pid>.jsonl`` under ``GC_LOG_DIR``; `gpu_bench` sums them per side.
"""

from __future__ import annotations

import gc
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from serve_apps.server import GpufleetServer

GC_LOG_DIR = Path(tempfile.gettempdir()) / "gpufleet-bench-gc"


class GcPauseLog:
    """A ``gc.callbacks`` entry that writes the collections worth seeing to a file."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = path.open("a", buffering=1)
        self.started = 0.0

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self.started = time.perf_counter()
            return
        ms = (time.perf_counter() - self.started) * 1000
        if ms >= 1.0 or info["generation"] == 2:
            self.file.write(json.dumps({"t": round(time.time(), 3), "generation": info["generation"],
                                        "ms": round(ms, 2), "collected": info["collected"]}) + "\n")


class GcLoggedServer(GpufleetServer):
    """gpufleet's replica, its collector pauses logged."""

    async def __init__(self, *args: Any, **kwargs: Any) -> None:
        await super().__init__(*args, **kwargs)
        gc.callbacks.append(GcPauseLog(GC_LOG_DIR / f"gc-{os.getpid()}.jsonl"))


def pause_summary(since: float, until: float) -> dict[str, Any]:
    """The pauses logged between two ``time.time()``s, per generation: count, total and largest ms."""
    out: dict[str, Any] = {}
    for f in GC_LOG_DIR.glob("gc-*.jsonl"):
        for line in f.read_text().splitlines():
            p = json.loads(line)
            if not since <= p["t"] <= until:
                continue
            g = out.setdefault(f"gen{p['generation']}", {"count": 0, "total_ms": 0.0, "max_ms": 0.0})
            g["count"] += 1
            g["total_ms"] = round(g["total_ms"] + p["ms"], 2)
            g["max_ms"] = max(g["max_ms"], p["ms"])
    return out
