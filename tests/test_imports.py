"""Planning code and the packages' public names are pure: importing them pulls in no Ray, torch or vLLM."""

import subprocess
import sys


def test_catalogue_imports_no_heavy_frameworks():
    code = ("import sys, gpufleet.catalogue.table, gpufleet.catalogue.planner, gpufleet.cli, gpufleet.jobs, gpufleet.serve_apps; "
            "print([m for m in ('ray', 'torch', 'vllm', 'deepspeed') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
