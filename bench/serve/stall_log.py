"""The log a watched replica (``bench.serve.variants``) writes and `gpu_bench` reads back per level: one
JSON line per event in ``<pid>.jsonl`` under ``WATCH_DIR``. Apart from the replica class so that reading
it imports no Ray."""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any, TextIO

WATCH_DIR = Path(tempfile.gettempdir()) / "gpufleet-bench-watch"


def write_event(log: TextIO, what: str, ms: float) -> None:
    log.write(json.dumps({"t": round(time.time(), 3), "what": what, "ms": round(ms, 2)}) + "\n")


def pause_summary(since: float, until: float) -> dict[str, Any]:
    """The events logged between two ``time.time()``s, per kind: count, total and largest ms."""
    out: dict[str, Any] = {}
    for f in WATCH_DIR.glob("*.jsonl"):
        for line in f.read_text().splitlines():
            p = json.loads(line)
            if not since <= p["t"] <= until:
                continue
            g = out.setdefault(p["what"], {"count": 0, "total_ms": 0.0, "max_ms": 0.0})
            g["count"] += 1
            g["total_ms"] = round(g["total_ms"] + p["ms"], 2)
            g["max_ms"] = max(g["max_ms"], p["ms"])
    return out
