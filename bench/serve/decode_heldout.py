"""Decode speed held out: serve plans' predicted time per output token against `vllm bench serve` on models the
decode model was not fitted to (see ``gpufleet.catalogue.serving``'s decode constants for what it was fitted to).

``--predict`` writes the predictions (commit them before measuring); ``--measure`` starts plain vLLM on each model
with dummy weights (its config.json and a tokenizer of its vocabulary size, nothing downloaded) and the plan's
engine arguments, drives it with ``vllm bench serve`` (random 128-in / 128-out, ``--ignore-eos``) at each
concurrency, and fills in the measured median TPOT; ``--compare`` recomputes the predictions of a results file.

    python -m bench.serve.decode_heldout --predict bench/serve/results/h100-decode-heldout-2.json \
        --models qwen3-8b,qwen2.5-14b:fp8,phi-3-medium-4k [--control llama-3.1-8b:fp8]
    python -m bench.serve.decode_heldout --measure bench/serve/results/h100-decode-heldout.json --tokenizers DIR --out OUT
    python -m bench.serve.decode_heldout --compare bench/serve/results/h100-decode-heldout.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from bench.serve import decode_speed
from gpufleet.catalogue.model import builtin_models, load_model
from gpufleet.catalogue.planner import plan

# the first held-out set (h100-decode-heldout.json); --models names another
MODELS = (("llama-3.2-3b", "none"), ("mistral-7b-v0.3", "fp8"), ("phi-3-mini-4k", "none"))
LEVELS = (1, 8, 32)
CONTEXT = 2048
GPU = "H100-80GB"


def engine_kwargs(name: str, quantization: str, gpu: str = GPU) -> dict:
    return plan(load_model(name), "serve", gpu, gpus=1, seq_len=CONTEXT, quantization=quantization).engine_kwargs


# a control runs with the engine arguments of the fitted run it repeats
CONTROL_RUNS = {"llama-3.1-8b": "h100-serve-8b-fp8.json", "llama-3.2-1b": "h100-serve.json"}


def control_engine(name: str) -> dict:
    return json.loads((decode_speed.DEFAULT.parent / CONTROL_RUNS[name]).read_text())["engine_kwargs"]


def predicted_tpot_ms(name: str, quantization: str, concurrency: int, engine: dict | None = None,
                      gpu: str = GPU) -> float:
    """The plan's decode step on ``gpu`` at ``concurrency``, with the plan's own engine arguments unless given
    others."""
    engine = engine or engine_kwargs(name, quantization, gpu)
    return round(decode_speed.predicted_tpot_ms(name, engine, concurrency, gpu), 3)


def parse_models(text: str) -> list[tuple[str, str]]:
    """``name[:quantization],...`` -> [(name, quantization)]."""
    return [(m.split(":")[0], m.split(":")[1] if ":" in m else "none") for m in text.split(",") if m]


def predict(models=MODELS, controls=(), gpu: str = GPU) -> dict:
    """Rows for ``models`` (held out) and ``controls`` (fitted models measured again in the same lease, to tell
    the lease's own per-step overhead from the model's error)."""
    rows = [{"model": m, "quantization": q, "concurrency": c, "held_out": True,
             "predicted_tpot_ms": predicted_tpot_ms(m, q, c, gpu=gpu)} for m, q in models for c in LEVELS]
    engines = {m: control_engine(m) for m, _ in controls}
    rows += [{"model": m, "quantization": q, "concurrency": c, "held_out": False, "engine": engines[m],
              "predicted_tpot_ms": predicted_tpot_ms(m, q, c, engines[m], gpu)} for m, q in controls for c in LEVELS]
    return {"gpu": gpu, "machine": None, "workload": "vllm bench serve, random 128 in / 128 out, --ignore-eos",
            "engine": "plain vLLM OpenAI server, dummy weights, the plan's engine_kwargs (max_model_len 2048)",
            "decode_rows": rows}


def measure(data: dict, tokenizers: Path, out: Path, max_models: int | None = None) -> dict:
    from bench.serve.bench import wait_ready
    from bench.serve.gpu_bench import MODEL_ID, bench_serve

    work = Path("/var/tmp/decode-heldout")
    work.mkdir(parents=True, exist_ok=True)
    for name, quantization in dict.fromkeys((r["model"], r["quantization"]) for r in data["decode_rows"]):
        rows = [r for r in data["decode_rows"] if r["model"] == name and r["quantization"] == quantization]
        if all(r.get("measured_tpot_ms") for r in rows):
            continue  # measured in an earlier run
        if max_models is not None and max_models <= 0:
            break  # the rest in another call (one call to the GPU machine runs at most 10 minutes)
        max_models = None if max_models is None else max_models - 1
        cfg = json.loads(builtin_models()[name].read_text())
        model_dir = work / name
        model_dir.mkdir(exist_ok=True)
        (model_dir / "config.json").write_text(json.dumps(cfg))
        tok = tokenizers / str(cfg["vocab_size"])
        for f in tok.iterdir():
            (model_dir / f.name).write_bytes(f.read_bytes())
        engine = rows[0].get("engine") or engine_kwargs(name, quantization, data.get("gpu", GPU))
        flags = [f"--{k.replace('_', '-')}={v}" for k, v in engine.items() if not isinstance(v, bool)]
        port = 8100
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
               "--served-model-name", MODEL_ID, "--load-format", "dummy", "--host", "127.0.0.1", "--port", str(port),
               *flags]
        t0 = time.monotonic()
        with open(work / f"{name}.log", "w") as log, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT) as proc:
            try:
                wait_ready(f"http://127.0.0.1:{port}/v1", timeout=300)
                start_s = round(time.monotonic() - t0, 1)
                for r in rows:
                    got = bench_serve(port, str(model_dir), r["concurrency"], max(32, 4 * r["concurrency"]), work)
                    r.update(measured_tpot_ms=got.get("median_tpot_ms"), failed=got.get("failed"),
                             start_s=start_s, command=" ".join(cmd[1:]))
                    if r["measured_tpot_ms"]:
                        r["error"] = round(r["predicted_tpot_ms"] / r["measured_tpot_ms"] - 1, 4)
                    print(name, r, flush=True)
            finally:
                proc.terminate()
                proc.wait(60)
        out.write_text(json.dumps(data, indent=1))  # what is measured so far survives a time limit
    return data


def table(data: dict) -> str:
    lines = [f"{'model':<18}{'quant':<7}{'held out':>9}{'conc':>5}{'predicted':>11}{'measured':>10}{'error':>8}"
             "   (TPOT, ms)"]
    for r in data["decode_rows"]:
        m = r.get("measured_tpot_ms")
        lines.append(f"{r['model']:<18}{r['quantization']:<7}{'yes' if r['held_out'] else 'no':>9}{r['concurrency']:>5}"
                     f"{r['predicted_tpot_ms']:>11.2f}"
                     + (f"{m:>10.2f}{r['predicted_tpot_ms'] / m - 1:>+8.1%}" if m else f"{'-':>10}"))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--predict", type=Path, help="Write the predictions to this file.")
    ap.add_argument("--models", type=parse_models, default=MODELS, help="With --predict: name[:quantization],...")
    ap.add_argument("--control", type=parse_models, default=(),
                    help="With --predict: fitted models to measure again in the same lease (held_out: false).")
    ap.add_argument("--gpu", default=GPU, help="With --predict: the GPU type the predictions are for.")
    ap.add_argument("--measure", type=Path, help="A predictions file to measure.")
    ap.add_argument("--tokenizers", type=Path, help="With --measure: a folder of tokenizers named by vocabulary size.")
    ap.add_argument("--out", type=Path, help="With --measure: where the results go (measured rows in it are kept).")
    ap.add_argument("--max-models", type=int, help="With --measure: measure at most this many models.")
    ap.add_argument("--compare", type=Path, help="Recompute the predictions of a results file.")
    a = ap.parse_args()
    if a.predict:
        data = predict(a.models, a.control, a.gpu)
        a.predict.write_text(json.dumps(data, indent=1))
    elif a.measure:
        data = json.loads((a.out if a.out and a.out.exists() else a.measure).read_text())
        data["machine"] = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                                         capture_output=True, text=True).stdout.strip()
        data = measure(data, a.tokenizers, a.out, a.max_models)
    else:
        data = json.loads(a.compare.read_text())
        for r in data["decode_rows"]:
            r["predicted_tpot_ms"] = predicted_tpot_ms(r["model"], r["quantization"], r["concurrency"], r.get("engine"),
                                                       data.get("gpu", GPU))
    print(table(data))


if __name__ == "__main__":
    main()
