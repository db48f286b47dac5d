"""A quiet terminal for the commands that start Ray, vLLM or DeepSpeed (up, train, serve, demo).

Those libraries log to the process's stdout and stderr in their own formats (Ray's JSON lines, DeepSpeed's
``[WARNING]``, vLLM's INFO lines, Python warnings), from handlers they add whenever they are imported, and
from the child processes they start. So the quiet terminal works below Python's logging: file descriptors 1
and 2 go to a log file, and gpufleet's own consoles keep copies of the terminal's. ``-v`` leaves everything
on the terminal.
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from pathlib import Path
from types import TracebackType

from rich.console import Console


def logs_dir() -> Path:
    from gpufleet.cluster.head import default_state_dir

    return default_state_dir() / "logs"


def quiet_terminal(consoles: list[Console], command: str) -> Path:
    """Send what libraries write to stdout and stderr to ``logs/<command>-<time>.log`` under GPUFLEET_HOME;
    ``consoles`` keep writing to the terminal. Says once where the log is; an unexpected error is one line
    here and its traceback goes to the log."""
    path = logs_dir() / f"{command}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    term_out = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8", errors="replace")
    term_err = os.fdopen(os.dup(2), "w", buffering=1, encoding="utf-8", errors="replace")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    for console in consoles:
        console.file = term_err if console.stderr else term_out

    def excepthook(kind: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
        traceback.print_exception(kind, exc, tb)  # into the log
        sys.stderr.flush()
        if not issubclass(kind, KeyboardInterrupt):
            term_err.write(f"error: {kind.__name__}: {exc} (traceback in {path})\n")

    sys.excepthook = excepthook
    term_err.write(f"library logs: {path} (-v shows them here)\n")
    return path
