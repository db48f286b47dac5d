"""Serving overhead: the gpufleet Serve endpoint vs plain vLLM on the same model and engine args.

Closed loop at each concurrency: every client streams /v1/completions (fixed prompt, 64 output
tokens, ignore_eos) back to back for ``--seconds``; output tokens/s counts the tokens streamed
(from the usage chunk), TTFT is the time to the first text chunk. Both servers run on this machine,
one after the other, started from this process's session. The gpufleet side deploys a one-model
serve spec as `gpufleet serve` does (``--ingress``) on a Ray cluster in the proxy mode `gpufleet up`
picks (``--serve-proxy``). Prints a table with the ratios and the CPU cores each process used per
level (where the overhead goes), and writes JSON.

    python bench/serve/bench.py [--model DIR] [--seconds 20] [--out bench/serve/results/cpu.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

HERE = Path(__file__).parent
LEVELS = (1, 8, 32)
PROMPT = "def fibonacci(n):"
MAX_TOKENS = 64
ENGINE = {"dtype": "float32", "max_model_len": 512, "enforce_eager": True}


async def one_level(url: str, model: str, concurrency: int, seconds: float) -> dict:
    from openai import AsyncOpenAI

    async with AsyncOpenAI(base_url=url, api_key="none", max_retries=0, timeout=300) as client:
        return await _closed_loop(client, model, concurrency, seconds)


async def _closed_loop(client, model: str, concurrency: int, seconds: float) -> dict:
    ttfts: list[float] = []
    tokens, errors = 0, 0
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal tokens, errors
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            first = None
            try:
                stream = await client.completions.create(
                    model=model, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0, stream=True,
                    stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
                async for chunk in stream:
                    if first is None and chunk.choices and chunk.choices[0].text:
                        first = time.perf_counter() - t0
                    if chunk.usage:
                        tokens += chunk.usage.completion_tokens
            except Exception:
                errors += 1
                continue
            if first is not None:
                ttfts.append(first)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - start
    return {"concurrency": concurrency, "requests": len(ttfts), "errors": errors,
            "output_tokens_per_s": tokens / wall, "ttft_median_ms": 1000 * statistics.median(ttfts) if ttfts else None,
            "ttft_p90_ms": 1000 * statistics.quantiles(ttfts, n=10)[-1] if len(ttfts) >= 10 else None}


def _label(proc) -> str:
    """A process's role: Ray's process title (ray::ProxyActor, raylet, ...) or its program name."""
    if proc.pid == os.getpid():
        return "client (this benchmark)"
    cmd = proc.cmdline()
    title = cmd[0] if cmd else proc.name()
    if title.startswith("ray::"):
        return title.split()[0].split(".")[0]
    return proc.name()


def cpu_snapshot() -> dict[int, tuple[str, float]]:
    import psutil

    out = {}
    for proc in psutil.process_iter():
        try:
            t = proc.cpu_times()
            out[proc.pid] = (_label(proc), t.user + t.system)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return out


def cpu_breakdown(before: dict, after: dict, wall: float) -> dict[str, float]:
    """Cores used per process role between two snapshots (the client, this process, included)."""
    used: dict[str, float] = {}
    for pid, (label, t) in after.items():
        used[label] = used.get(label, 0.0) + (t - before.get(pid, (label, 0.0))[1]) / wall
    return {k: round(v, 3) for k, v in sorted(used.items(), key=lambda kv: -kv[1]) if v >= 0.005}


def measure(url: str, model: str, seconds: float) -> list[dict]:
    asyncio.run(one_level(url, model, 1, 3))  # warm-up
    rows = []
    for c in LEVELS:
        before, t0 = cpu_snapshot(), time.perf_counter()
        row = asyncio.run(one_level(url, model, c, seconds))
        row["cores_by_process"] = cpu_breakdown(before, cpu_snapshot(), time.perf_counter() - t0)
        rows.append(row)
    return rows


def wait_ready(url: str, timeout: float = 300) -> None:
    import requests

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if requests.get(f"{url}/models", timeout=2).ok:
                return
        except Exception:
            pass
        time.sleep(1)
    raise TimeoutError(f"{url} not ready after {timeout}s")


def run_plain_vllm(model_dir: str, port: int, seconds: float, beside_idle_ray: bool = False) -> list[dict]:
    """Plain ``vllm serve``; with ``beside_idle_ray`` a Ray Serve cluster (no application) runs next to
    it, so the table shows what Ray's own processes cost the engine without any request passing them."""
    if beside_idle_ray:
        import ray
        from ray import serve

        from gpufleet.cluster.head import free_port

        ray.init(num_cpus=8, include_dashboard=False, logging_level="ERROR")
        serve.start(http_options={"host": "127.0.0.1", "port": free_port()})
    try:
        return _plain_vllm(model_dir, port, seconds)
    finally:
        if beside_idle_ray:
            serve.shutdown()
            ray.shutdown()


def _plain_vllm(model_dir: str, port: int, seconds: float) -> list[dict]:
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir,
           "--served-model-name", "tiny", "--host", "127.0.0.1", "--port", str(port), "--dtype", ENGINE["dtype"],
           "--max-model-len", str(ENGINE["max_model_len"]), "--enforce-eager"]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}/v1"
        wait_ready(url)
        return measure(url, "tiny", seconds)
    finally:
        proc.terminate()
        proc.wait(30)


def run_gpufleet(model_dir: str, port: int, seconds: float, workdir: Path, stream_batching_ms: int | None,
                 ingress: str) -> list[dict]:
    import ray
    from ray import serve

    from gpufleet.serve_apps.app import deploy
    from gpufleet.serve_apps.spec import load_serve_spec

    spec_file = workdir / "bench-serve.yaml"
    spec_file.write_text(yaml.safe_dump({"name": "bench", "port": port, "ingress": ingress, "models": [
        {"id": "tiny", "source": model_dir, "max_model_len": ENGINE["max_model_len"], "concurrency": 32,
         "stream_batching_ms": stream_batching_ms}]}))
    ray.init(num_cpus=8, include_dashboard=False, logging_level="ERROR")
    try:
        spec, base = load_serve_spec(spec_file)
        url = deploy(spec, base)
        wait_ready(url)
        return measure(url, "tiny", seconds)
    finally:
        serve.shutdown()
        ray.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=".demo/tiny-model")
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--out", default=str(HERE / "results" / "cpu.json"))
    ap.add_argument("--stream-batching-ms", type=int, help="gpufleet side: Ray Serve LLM's stream batching interval")
    ap.add_argument("--throughput-optimized", action="store_true",
                    help="gpufleet side: start Ray with RAY_SERVE_THROUGHPUT_OPTIMIZED=1 (Ray Serve's own fast-path flags)")
    ap.add_argument("--ingress", choices=["auto", "direct", "router"], default="auto",
                    help="gpufleet side: the serve spec's ingress (auto: direct behind HAProxy, else router)")
    ap.add_argument("--serve-proxy", choices=["auto", "haproxy", "ray"], default="auto",
                    help="gpufleet side: Serve's HTTP front, as `gpufleet up --serve-proxy` (auto: HAProxy if installed)")
    ap.add_argument("--beside-idle-ray", action="store_true",
                    help="also measure plain vLLM with an idle Ray Serve cluster running beside it")
    args = ap.parse_args()
    # Ray's driver logging would print (and format) a line per client request at INFO: keep the
    # client's cost the same on both sides.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    from gpufleet.cluster.head import free_port, serve_proxy_env

    if args.throughput_optimized:  # read by the proxy and replicas, which inherit this process's env
        os.environ["RAY_SERVE_THROUGHPUT_OPTIMIZED"] = "1"
    # Ray reads the proxy mode at import, in every process: set it before Ray starts, as `gpufleet up` does.
    proxy_env = serve_proxy_env(args.serve_proxy)
    os.environ.update(proxy_env)
    from gpufleet.jobs.tiny_model import build_tiny_model

    model_dir = str(build_tiny_model(args.model).resolve())
    plain = run_plain_vllm(model_dir, free_port(), args.seconds)
    beside = run_plain_vllm(model_dir, free_port(), args.seconds, beside_idle_ray=True) if args.beside_idle_ray \
        else None
    ours = run_gpufleet(model_dir, free_port(), args.seconds, Path(args.out).parent, args.stream_batching_ms,
                        args.ingress)
    rows = []
    print(f"{'concurrency':>11} | {'plain vLLM tok/s':>16} | {'gpufleet tok/s':>14} | {'ratio':>5} | "
          f"{'TTFT plain ms':>13} | {'TTFT gpufleet ms':>16} | {'overhead ms':>11}")
    for i, (p, g) in enumerate(zip(plain, ours, strict=True)):
        ratio = g["output_tokens_per_s"] / p["output_tokens_per_s"] if p["output_tokens_per_s"] else None
        over = (g["ttft_median_ms"] - p["ttft_median_ms"]) if g["ttft_median_ms"] and p["ttft_median_ms"] else None
        rows.append({"concurrency": p["concurrency"], "plain_vllm": p, "gpufleet": g, "throughput_ratio": ratio,
                     "ttft_overhead_ms": over})
        if beside:
            b = beside[i]
            rows[-1]["plain_vllm_beside_idle_ray"] = b
            rows[-1]["beside_idle_ray_ratio"] = b["output_tokens_per_s"] / p["output_tokens_per_s"]
        print(f"{p['concurrency']:>11} | {p['output_tokens_per_s']:>16.0f} | {g['output_tokens_per_s']:>14.0f} | "
              f"{ratio:>5.2f} | {p['ttft_median_ms']:>13.0f} | {g['ttft_median_ms']:>16.0f} | {over:>11.0f}")
    if beside:
        print("plain vLLM with an idle Ray Serve cluster beside it, tok/s (ratio to plain vLLM alone): " + ", ".join(
            f"c={r['concurrency']} {r['plain_vllm_beside_idle_ray']['output_tokens_per_s']:.0f} "
            f"({r['beside_idle_ray_ratio']:.2f})" for r in rows))
    for side, levels in (("plain vLLM", plain), ("plain vLLM beside idle Ray", beside or []), ("gpufleet", ours)):
        for level in levels:
            print(f"cores used at concurrency {level['concurrency']}, {side}: "
                  + ", ".join(f"{k} {v:.2f}" for k, v in level["cores_by_process"].items()))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
                                          "engine": ENGINE, "max_tokens": MAX_TOKENS, "seconds": args.seconds,
                                          "stream_batching_ms": args.stream_batching_ms,
                                          "throughput_optimized": args.throughput_optimized,
                                          "ingress": args.ingress,
                                          "serve_proxy": "haproxy" if proxy_env else "ray",
                                          "server": "gpufleet.serve_apps.server:GpufleetServer",
                                          "rows": rows}, indent=1) + "\n")
    print("wrote", args.out)


if __name__ == "__main__":
    main()
