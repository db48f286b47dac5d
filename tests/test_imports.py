"""Planning code and the packages' public names are pure: importing them pulls in no Ray, torch or vLLM."""

import subprocess
import sys


def test_catalogue_imports_no_heavy_frameworks():
    code = ("import sys, gpufleet.catalogue.table, gpufleet.catalogue.planner, gpufleet.cli, gpufleet.jobs, gpufleet.serve_apps; "
            "print([m for m in ('ray', 'torch', 'vllm', 'deepspeed') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


CLIENT_ONLY = """
import sys
for name in ("torch", "vllm", "deepspeed", "transformers", "peft", "ray.serve", "ray.train"):
    sys.modules[name] = None  # what `pip install gpufleet` on a laptop lacks: importing it fails
from gpufleet.cli import main
sys.argv = ["gpufleet", *sys.argv[1:]]
main()
"""


def test_a_client_install_plans_and_emits_manifests_without_the_node_packages(tmp_path):
    """`pip install gpufleet` (no `node` extra) must plan and emit manifests: none of these commands may
    import torch, vLLM, DeepSpeed, transformers or Ray Serve / Train."""
    from pathlib import Path

    root = Path(__file__).parents[1]
    for args in (["plan", "llama-3.1-8b", "--task", "full", "--gpu", "H100-80GB", "--cluster", "cluster.yaml"],
                 ["train", "examples/gpu/lora-8b-a10g.yaml", "--emit-config"],
                 ["serve", "examples/gpu/serve-70b-h100.yaml", "--emit-config", "--format", "kuberay"]):
        r = subprocess.run([sys.executable, "-c", CLIENT_ONLY, *args], cwd=root, capture_output=True, text=True,
                           timeout=120)
        assert r.returncode == 0, (args, r.stderr[-2000:])
