"""The whole story end to end, as `make demo` runs it: plan, LoRA fine-tune by `ray job submit`,
serve base + adapter with Ray Serve + vLLM, and the adapter answers in the trained format."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from gpufleet.cluster.head import free_port, head_processes

pytestmark = pytest.mark.slow
ROOT = Path(__file__).parents[1]
# What libraries' log lines look like: Ray's JSON records, DeepSpeed's [WARNING], vLLM's and Ray's timestamps.
RAW_LOG_LINE = re.compile(r'"levelname"|\[(INFO|WARNING|ERROR)\]|\b(INFO|WARNING|DEBUG)\b.*\d\d:\d\d:\d\d')


def test_demo_adapter_answers_in_the_trained_format(short_tmp):
    demo_dir = short_tmp / "demo"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "GPUFLEET_HOME")}
    p = subprocess.run([sys.executable, "-m", "gpufleet.cli", "demo", "--demo-dir", str(demo_dir), "--port", str(free_port()),
                        "--dashboard-port", str(free_port())], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=900)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    result = json.loads((demo_dir / "answers.json").read_text())
    assert result["learned"]
    assert result["answers"]["tiny:greeter"].startswith("GPUFLEET SAYS: hello")
    assert "GPUFLEET" not in result["answers"]["tiny"]
    assert "nothing left running" in p.stdout and head_processes(None) == []  # replicas and engines included
    raw = [line for line in (p.stdout + p.stderr).splitlines() if RAW_LOG_LINE.search(line)]
    assert not raw, raw[:5]
    log = Path(re.search(r"library logs: (\S+)", p.stderr).group(1))
    assert "Started Serve" in log.read_text()  # Ray Serve's own lines went there
