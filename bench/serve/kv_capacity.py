"""KV-cache capacity: the plan's prediction against what vLLM reports when it starts, on a GPU.

For each built-in model, vLLM starts with random ("dummy") weights from the model's config.json
alone (no checkpoint, no tokenizer), with exactly the plan's ``engine_kwargs`` (one GPU, CUDA graphs
and torch.compile on, vLLM's defaults), and reports ``GPU KV cache size: N tokens``,
``Maximum concurrency for L tokens per request`` and its memory profile (weights, activation peak,
non-torch memory, KV bytes). The plan's numbers for the same model, GPU and settings stand beside
them. Prints a table and writes JSON.

    python bench/serve/kv_capacity.py --gpu H100-80GB --models llama-3.2-1b qwen2.5-7b --out kv.json
    python bench/serve/kv_capacity.py --compare bench/serve/results/h100-kv-capacity.json   # predicted now
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
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from gpufleet.catalogue.gpus import GIB  # noqa: E402
from gpufleet.catalogue.model import builtin_models, load_model  # noqa: E402
from gpufleet.catalogue.planner import plan  # noqa: E402

PATTERNS = {  # vLLM 0.26's log lines (DEBUG for the memory profile)
    "kv_tokens": r"GPU KV cache size: ([\d,]+) tokens",
    "max_concurrency": r"Maximum concurrency for [\d,]+ tokens per request: ([\d.]+)x",
    "kv_gib": r"Available KV cache memory: ([\d.]+) GiB",
    "total_gib": r"total_memory=([\d.]+)GiB",
    "weights_gib": r"weights memory: ([\d.]+)GiB",
    "activation_gib": r"torch peak memory increase: ([\d.]+)GiB",
    "non_torch_gib": r"non-torch forward increase memory: ([\d.]+)GiB",
    "cuda_graph_gib": r"Graph capturing finished in [\d.]+ secs?, took ([\d.-]+) GiB",
}
START = """
import json, sys
from vllm import LLM
LLM(model=sys.argv[1], load_format="dummy", skip_tokenizer_init=True, seed=0, **json.loads(sys.argv[2]))
print("VLLM_STARTED", flush=True)
"""


def serve_plan(name: str, gpu: str, util: float, max_len: int, fp8: str = "none"):
    """``fp8``: none, weights (vLLM's online FP8 quantization) or weights+kv (also an FP8 KV cache)."""
    return plan(load_model(name), "serve", gpu, gpus=1, seq_len=max_len, headroom=round(1 - util, 4),
                quantization="fp8" if fp8 != "none" else "none", kv_cache_dtype="fp8" if fp8 == "weights+kv" else "auto")


def measure(name: str, engine: dict, work: Path, timeout_s: float) -> dict:
    """Start vLLM on ``name``'s config with dummy weights and ``engine``; return what its log says."""
    model_dir = work / name
    model_dir.mkdir(parents=True, exist_ok=True)
    cfg = json.loads(builtin_models()[name].read_text())
    (model_dir / "config.json").write_text(json.dumps(cfg))
    t0 = time.monotonic()
    try:
        p = subprocess.run([sys.executable, "-c", START, str(model_dir), json.dumps(engine)], capture_output=True,
                           text=True, timeout=timeout_s, env={**os.environ, "VLLM_LOGGING_LEVEL": "DEBUG"})
    except subprocess.TimeoutExpired as e:
        return {"started": False, "error": f"no start within {timeout_s:g}s", "log_tail": str(e.stdout)[-1500:]}
    log = p.stdout + p.stderr
    (work / f"{name}.log").write_text(log)
    row: dict = {"started": "VLLM_STARTED" in p.stdout, "start_s": round(time.monotonic() - t0, 1)}
    for key, pattern in PATTERNS.items():
        m = re.findall(pattern, log)
        if m:
            row[key] = float(m[-1].replace(",", ""))
    if not row["started"]:
        row["error"] = "\n".join(log.strip().splitlines()[-5:])
    return row


def predict(name: str, gpu: str, util: float, max_len: int, fp8: str = "none") -> dict:
    p = serve_plan(name, gpu, util, max_len, fp8)
    mem = p.serving
    return {"engine_kwargs": p.engine_kwargs, "kv_tokens": mem.kv_tokens, "max_concurrency": round(mem.kv_tokens / max_len, 2),
            "kv_gib": round(mem.kv_cache / GIB, 3), "weights_gib": round(mem.weights / GIB, 3),
            "activation_gib": round(mem.activation_peak / GIB, 3), "non_torch_gib": round(mem.non_torch / GIB, 3),
            "max_model_len": mem.max_model_len}


def table(rows: list[dict]) -> str:
    head = f"{'model':<18}{'measured tokens':>16}{'predicted':>12}{'error':>8}  {'weights m/p GiB':>16}  {'act m/p':>12}"
    lines = [head]
    for r in rows:
        m, p = r["measured"], r["predicted"]
        if "kv_tokens" not in m:
            lines.append(f"{r['model']:<18}{'(no start)':>16}{p['kv_tokens']:>12,}")
            continue
        lines.append(f"{r['model']:<18}{int(m['kv_tokens']):>16,}{p['kv_tokens']:>12,}{r['error']:>+8.1%}  "
                     f"{m.get('weights_gib', 0):>7.2f}/{p['weights_gib']:<7.2f}  "
                     f"{m.get('activation_gib', 0):>5.2f}/{p['activation_gib']:<5.2f}")
    return "\n".join(lines)


def with_predictions(rows: list[dict], gpu: str, util: float, max_len: int, fp8: str = "none") -> list[dict]:
    for r in rows:
        r["predicted"] = predict(r["model"], gpu, util, max_len, fp8)
        if "kv_tokens" in r["measured"]:
            r["error"] = round(r["predicted"]["kv_tokens"] / r["measured"]["kv_tokens"] - 1, 4)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpu", default="H100-80GB")
    ap.add_argument("--models", nargs="*", default=["llama-3.2-1b", "qwen2.5-7b", "llama-3.1-8b", "mistral-7b-v0.3"])
    ap.add_argument("--utilization", type=float, default=0.9)
    ap.add_argument("--max-model-len", type=int, default=8192)
    ap.add_argument("--timeout", type=float, default=300, help="Seconds one vLLM start may take.")
    ap.add_argument("--fp8", choices=["none", "weights", "weights+kv"], default="none",
                    help="FP8 weights (quantization: fp8) and optionally an FP8 KV cache (kv_cache_dtype: fp8).")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--compare", type=Path, help="Recompute the predictions of a results file; measure nothing.")
    a = ap.parse_args()
    if a.compare:
        data = json.loads(a.compare.read_text())
        rows = with_predictions(data["rows"], data["gpu"], data["gpu_memory_utilization"], data["max_model_len"],
                                data.get("fp8", "none"))
    else:
        work = Path(tempfile.mkdtemp(prefix="kv-", dir=os.environ.get("KV_WORK", "/var/tmp")))
        rows = []
        for name in a.models:
            engine = serve_plan(name, a.gpu, a.utilization, a.max_model_len, a.fp8).engine_kwargs
            rows.append({"model": name, "measured": measure(name, engine, work, a.timeout)})
            if a.out:  # what is measured so far survives a time limit
                a.out.write_text(json.dumps({"partial": True, "rows": rows}, indent=1))
            print(name, rows[-1]["measured"], flush=True)
        rows = with_predictions(rows, a.gpu, a.utilization, a.max_model_len, a.fp8)
        data = {"gpu": a.gpu, "gpu_memory_utilization": a.utilization, "max_model_len": a.max_model_len, "fp8": a.fp8,
                "machine": _machine(), "engine": "vLLM dummy weights, bf16, CUDA graphs + torch.compile (defaults)",
                "command": " ".join(sys.argv), "rows": rows}
    print(table(rows))
    if a.out:
        a.out.write_text(json.dumps(data, indent=1))
    return 0


def _machine() -> str:
    try:
        import torch
        import vllm

        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}, vLLM {vllm.__version__}"
    except Exception as e:  # where it is only compared, not measured
        return f"unknown ({type(e).__name__})"


if __name__ == "__main__":
    sys.exit(main())
