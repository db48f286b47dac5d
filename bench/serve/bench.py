"""Serving overhead: the gpufleet Serve endpoint vs plain vLLM on the same model and engine args.

Closed loop at each concurrency: every client streams /v1/completions (fixed prompt, 64 output
tokens, ignore_eos) back to back for ``--seconds``; output tokens/s counts the tokens streamed
(from the usage chunk), TTFT is the time to the first text chunk. Both servers run on this machine,
one after the other, started from this process's session. Prints a table with the ratios and
writes JSON.

    python bench/serve/bench.py [--model DIR] [--seconds 20] [--out bench/serve/results/cpu.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
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


def measure(url: str, model: str, seconds: float) -> list[dict]:
    asyncio.run(one_level(url, model, 1, 3))  # warm-up
    return [asyncio.run(one_level(url, model, c, seconds)) for c in LEVELS]


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


def run_plain_vllm(model_dir: str, port: int, seconds: float) -> list[dict]:
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
                 direct_streaming: bool = False) -> list[dict]:
    import ray
    from ray import serve

    from serve_apps.app import deploy, llm_configs
    from serve_apps.spec import load_serve_spec

    spec_file = workdir / "bench-serve.yaml"
    spec_file.write_text(yaml.safe_dump({"name": "bench", "port": port, "models": [
        {"id": "tiny", "source": model_dir, "context": ENGINE["max_model_len"], "concurrency": 32,
         "stream_batching_ms": stream_batching_ms}]}))
    ray.init(num_cpus=8, include_dashboard=False, logging_level="ERROR")
    try:
        spec, base = load_serve_spec(spec_file)
        if direct_streaming:  # gpufleet's LLM configs on Ray's own direct-streaming app (no auth, no local LoRA)
            from ray.serve.llm import build_openai_app

            serve.start(http_options={"host": "127.0.0.1", "port": port})
            serve.run(build_openai_app({"llm_configs": llm_configs(spec, base)}), name=spec.name, route_prefix="/")
            url = f"http://127.0.0.1:{port}/v1"
        else:
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
    ap.add_argument("--direct-streaming", metavar="HAPROXY",
                    help="gpufleet side: Ray's direct-streaming mode (replica serves HTTP, HAProxy in front; "
                         "needs the haproxy binary at this path)")
    args = ap.parse_args()
    if args.throughput_optimized:  # read by the proxy and replicas, which inherit this process's env
        os.environ["RAY_SERVE_THROUGHPUT_OPTIMIZED"] = "1"
    if args.direct_streaming:  # Ray reads these at import time, in every process: set before Ray starts
        os.environ.update(RAY_SERVE_LLM_ENABLE_DIRECT_STREAMING="1", RAY_SERVE_ENABLE_HA_PROXY="1",
                          RAY_SERVE_HAPROXY_BINARY_PATH=args.direct_streaming)
    from cluster.head import free_port
    from jobs.tiny_model import build_tiny_model

    model_dir = str(build_tiny_model(args.model).resolve())
    plain = run_plain_vllm(model_dir, free_port(), args.seconds)
    ours = run_gpufleet(model_dir, free_port(), args.seconds, Path(args.out).parent, args.stream_batching_ms,
                        direct_streaming=bool(args.direct_streaming))
    rows = []
    print(f"{'concurrency':>11} | {'plain vLLM tok/s':>16} | {'gpufleet tok/s':>14} | {'ratio':>5} | "
          f"{'TTFT plain ms':>13} | {'TTFT gpufleet ms':>16} | {'overhead ms':>11}")
    for p, g in zip(plain, ours, strict=True):
        ratio = g["output_tokens_per_s"] / p["output_tokens_per_s"] if p["output_tokens_per_s"] else None
        over = (g["ttft_median_ms"] - p["ttft_median_ms"]) if g["ttft_median_ms"] and p["ttft_median_ms"] else None
        rows.append({"concurrency": p["concurrency"], "plain_vllm": p, "gpufleet": g, "throughput_ratio": ratio,
                     "ttft_overhead_ms": over})
        print(f"{p['concurrency']:>11} | {p['output_tokens_per_s']:>16.0f} | {g['output_tokens_per_s']:>14.0f} | "
              f"{ratio:>5.2f} | {p['ttft_median_ms']:>13.0f} | {g['ttft_median_ms']:>16.0f} | {over:>11.0f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
                                          "engine": ENGINE, "max_tokens": MAX_TOKENS, "seconds": args.seconds,
                                          "stream_batching_ms": args.stream_batching_ms,
                                          "throughput_optimized": args.throughput_optimized,
                                          "direct_streaming": bool(args.direct_streaming),
                                          "server": "serve_apps.server:GpufleetServer (first chunk at once)",
                                          "rows": rows}, indent=1) + "\n")
    print("wrote", args.out)


if __name__ == "__main__":
    main()
