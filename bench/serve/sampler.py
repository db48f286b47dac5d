"""A stack sampler that runs inside each profiled process, for machines where py-spy cannot attach
(the lent GPU machine's sandbox refuses it: "Failed to find python version from target process").

`gpu_bench --profile` puts ``bench/serve/sampling`` (whose ``sitecustomize`` calls ``start``) on the
PYTHONPATH of every process it starts, with ``SAMPLE_DIR_ENV`` naming a folder. Each Python process
then runs one daemon thread that, while the folder holds a file ``active`` (written by the bench for
the length of a level: its content is the level's label), takes every thread's Python stack
``RATE_HZ`` times a second; when the file goes it writes what it took as
``<label>-<pid>.txt``: a first line with the process title, then py-spy's raw format
(``thread <name>;frame;frame;... count``), which ``gpu_bench.summarize_stacks`` reads.
Samples hold the GIL briefly (a stack walk per thread), so a profiled side is a diagnosis, not a
throughput run.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections import Counter
from pathlib import Path

SAMPLE_DIR_ENV = "GPUFLEET_SAMPLE_DIR"
ACTIVE = "active"
RATE_HZ = 200
POLL_S = 0.05  # how often an idle sampler looks for the active file


def _stack(frame) -> str:
    names = []
    while frame is not None:
        code = frame.f_code
        names.append(f"{code.co_name} ({code.co_filename}:{frame.f_lineno})")
        frame = frame.f_back
    return ";".join(reversed(names))


def _title() -> str:
    try:  # Ray and vLLM set their process titles in argv's memory: /proc shows them
        raw = Path("/proc/self/cmdline").read_bytes().replace(b"\0", b" ").replace(b"\n", b" ")
        return raw.decode(errors="replace").strip()[:200]
    except OSError:
        return " ".join(sys.argv)[:200]


def _sample_while_active(folder: Path, me: int) -> Counter:
    counts: Counter = Counter()
    active, period, next_check = folder / ACTIVE, 1.0 / RATE_HZ, 0.0
    while True:
        now = time.monotonic()
        if now >= next_check:
            if not active.exists():
                return counts
            next_check = now + POLL_S
        names = {t.ident: t.name for t in threading.enumerate()}
        for ident, frame in sys._current_frames().items():
            if ident != me:
                counts[f"thread {names.get(ident, ident)};{_stack(frame)}"] += 1
        time.sleep(period)


def _run(folder: Path) -> None:
    me = threading.get_ident()
    active = folder / ACTIVE
    while True:
        try:
            label = active.read_text().strip()
        except OSError:
            time.sleep(POLL_S)
            continue
        counts = _sample_while_active(folder, me)
        lines = [_title()] + [f"{stack} {n}" for stack, n in counts.items()]
        part = folder / f"{label}-{os.getpid()}.part"  # renamed when whole: the bench reads only *.txt
        part.write_text("\n".join(lines) + "\n")
        part.replace(part.with_suffix(".txt"))


def sampled_env(folder: Path, pythonpath: str | None = None) -> dict[str, str]:
    """The environment that makes a Python process started with it run the sampler into ``folder``:
    this folder's ``sampling/sitecustomize.py`` and the repository (which it imports) ahead of
    ``pythonpath``."""
    here = Path(__file__).resolve().parent
    paths = [str(here / "sampling"), str(here.parents[1]), *filter(None, [pythonpath])]
    return {SAMPLE_DIR_ENV: str(folder), "PYTHONPATH": os.pathsep.join(paths)}


def _start_thread(folder: Path) -> None:
    threading.Thread(target=_run, args=(folder,), name="gpufleet-sampler", daemon=True).start()


def start() -> None:
    """Start the sampler thread if ``SAMPLE_DIR_ENV`` is set (called from ``sitecustomize``), and again
    in every forked child (vLLM forks its engine core; a thread does not survive a fork)."""
    folder = os.environ.get(SAMPLE_DIR_ENV)
    if folder:
        _start_thread(Path(folder))
        os.register_at_fork(after_in_child=lambda: _start_thread(Path(folder)))
