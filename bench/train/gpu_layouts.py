"""The planner's own training layouts through gpufleet's real path (Ray Train + DeepSpeed) on a GPU,
measured against the plan: GPU peak, host RAM, tokens/s, MFU, loss.

Each case writes a job spec and calls ``gpufleet.jobs.finetune.run`` (what `gpufleet train` runs), on a
random-weight model built from a built-in config and a synthetic chat dataset long enough for
``steps`` optimizer steps. The prediction is ``gpufleet.catalogue.memory.estimate`` for the layout the job
actually ran (plan plus the spec's overrides), the host RAM the worker's peak RSS. A case the cluster
cannot hold records the one-line refusal instead. ``resume`` kills the worker mid-run (as the CPU test
does) and checks the step counter continues from the checkpoint.

    python bench/train/gpu_layouts.py --out DIR --tokenizer TOK_DIR --build build_model.py \
        [--cases 8b-full,8b-lora,3b-full-offload,resume] [--steps 8]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import threading
import time
import traceback
from pathlib import Path

import yaml

from gpufleet.catalogue.flops import mfu, train_flops_per_token
from gpufleet.catalogue.gpus import GIB, get_gpu
from gpufleet.catalogue.memory import TrainSetup, estimate, host_peak
from gpufleet.catalogue.model import MODELS_DIR, load_model
from gpufleet.catalogue.plans import LAYOUT_PINS

# name -> (built-in model, task, plan overrides, global batch, seq)
CASES = {
    "8b-full": ("llama-3.1-8b", "full", {}, 16, 2048),
    "8b-lora": ("llama-3.1-8b", "lora", {}, 16, 2048),
    "8b-qlora": ("llama-3.1-8b", "qlora", {}, 16, 2048),
    "3b-qlora": ("llama-3.2-3b", "qlora", {}, 16, 2048),
    "gemma2-2b-qlora": ("gemma-2-2b", "qlora", {}, 16, 2048),
    "3b-full-offload": ("llama-3.2-3b", "full", {"offload_optimizer": True, "zero_stage": 2, "grad_ckpt": True}, 16,
                        2048),
    "resume": ("llama-3.2-1b", "lora", {}, 8, 1024),
    # held out for the ZeRO-2 offload terms read off 3b-full-offload and 8b-full: with and without accumulation
    "qwen1.5b-full-offload": ("qwen2.5-1.5b", "full", {"offload_optimizer": True, "zero_stage": 2, "grad_ckpt": True,
                                                       "micro_batch": 4}, 16, 2048),
    "gemma2-2b-full-offload": ("gemma-2-2b", "full", {"offload_optimizer": True, "zero_stage": 2, "grad_ckpt": True,
                                                      "micro_batch": 16}, 16, 2048),
}
WORDS = ["gpu", "cluster", "plan", "tensor", "memory", "cache", "layer", "token", "model", "serve", "train", "batch", "node", "rank", "shard", "optimizer", "gradient", "checkpoint", "kernel", "stream", "replica", "adapter", "schedule", "warmup", "loss", "step", "epoch"]


def synthetic_chat(path: Path, n: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    with path.open("w") as f:
        for _ in range(n):
            q = " ".join(rng.choices(WORDS, k=rng.randint(40, 120)))
            a = " ".join(rng.choices(WORDS, k=rng.randint(80, 240)))
            f.write(json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
                    + "\n")


def build(model: str, tokenizer: Path, script: Path, root: Path) -> Path:
    out = root / model
    if not (out / "config.json").exists():
        subprocess.run(["python", str(script), str(MODELS_DIR / f"{model}.json"), str(tokenizer), str(out)], check=True)
    return out


def job_spec(path: Path, name: str, model_dir: Path, data: Path, task: str, overrides: dict, batch: int, seq: int,
             steps: int, out: Path, every: int, failures: int = 0, gpu: str = "H100-80GB") -> Path:
    spec = dict(name=name, model=str(model_dir), dataset=str(data), task=task, learning_rate=2e-5 if task == "full"
                else 2e-4, warmup_steps=2, max_steps=steps, global_batch=batch, seq_len=seq, checkpoint_every=every,
                log_every=1, gpu=gpu, output_dir=str(out), max_failures=failures, plan=overrides,
                final_checkpoint=failures > 0)  # a full model's optimizer state is tens of GB of disk
    path.write_text(yaml.safe_dump(spec))
    return path


def predict(model: str, task: str, seq: int, layout: dict) -> dict:
    """The memory model's GPU peak and worker host RSS (GiB) for the layout a job ran."""
    spec = load_model(model)
    if task == "qlora":  # sized as transformers + peft: DeepSpeed ZeRO-0 adds nothing to it
        setup = TrainSetup(task=task, micro_batch=layout["micro_batch"], seq_len=seq, grad_ckpt=True)
    else:
        setup = TrainSetup(task=task, dtype="bfloat16", micro_batch=layout["micro_batch"],
                           grad_accum=layout["grad_accum"], seq_len=seq, grad_ckpt=layout["grad_ckpt"],
                           engine="deepspeed", compile=layout["compile"],
                           data_parallel=layout.get("workers", 1), zero_stage=layout["zero_stage"],
                           offload_optimizer=layout["offload_optimizer"], offload_params=layout["offload_params"])
    pred = estimate(spec, setup)
    return {"predicted_peak_gib": round(pred.peak / GIB, 3),
            "predicted_host_gib": round(host_peak(spec, setup, pred) / GIB, 2)}


def scored(peak: float, host: float, pred: dict) -> dict:
    """Measured GPU peak and host RSS (GiB) beside a prediction, with the prediction's relative errors."""
    return dict(peak_gib=round(peak, 3), **pred, peak_error=round(pred["predicted_peak_gib"] / peak - 1, 4),
                host_peak_gib=round(host, 2),
                host_error=round(pred["predicted_host_gib"] / host - 1, 4) if host else None)


def kept_layout(layout: dict) -> dict:
    """What the memory model needs of a job's layout (``TrainLayout.model_dump()``), its workers counted."""
    kept = {k: layout[k] for k in (*LAYOUT_PINS, "grad_accum", "compile")}
    return {**kept, "workers": len(layout["placement"]["bundles"])}


def measured(out: Path, model: str, task: str, seq: int, layout: dict, gpu: str) -> dict:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    spec = load_model(model)
    kept = kept_layout(layout)
    pred = predict(model, task, seq, kept)
    steady = rows[2:] or rows  # the first steps compile
    tps = sorted(r["tokens_per_s"] for r in steady)[len(steady) // 2]  # every worker's tokens together
    peak = max(r["peak_memory_gib"] for r in rows)
    host = max(r.get("host_peak_gib", 0) for r in rows)
    return dict(
        layout=kept, steps=len(rows), loss_first=rows[0]["loss"], loss_last=rows[-1]["loss"],
        tokens_per_s=round(tps), mfu=round(mfu(tps / kept["workers"], train_flops_per_token(spec, seq, task),
                                              get_gpu(gpu).peak_tflops), 4),
        **scored(peak, host, pred), resumed_from=max(r["resumed_from"] for r in rows), step_counter=[r["step"] for r in rows])


def compare(result: dict) -> list[dict]:
    """Each row that ran, measured against the current model's prediction for its layout."""
    out = []
    for r in result["rows"]:
        if r.get("status") != "ok":
            continue
        pred = predict(r["model"], r["task"], r["seq"], r["layout"])
        out.append({"case": r["case"], **scored(r["peak_gib"], r["host_peak_gib"], pred),
                    "held_out": r.get("held_out", False)})
    return out


def print_table(rows: list[dict]) -> None:
    print(f"{'case':<24} {'GPU GiB':>8} {'plan':>7} {'error':>7} {'host GiB':>9} {'plan':>7} {'error':>7}")
    for r in rows:
        print(f"{r['case']:<24} {r['peak_gib']:>8.2f} {r['predicted_peak_gib']:>7.2f} {r['peak_error']:>+7.1%} "
              f"{r['host_peak_gib']:>9.1f} {r['predicted_host_gib']:>7.1f} {r['host_error']:>+7.1%}")


def kill_when(out: Path, at_step: int, killed: dict) -> None:
    metrics, pid_file = out / "metrics.jsonl", out / "pids" / "rank0.pid"
    deadline = time.monotonic() + 400
    while time.monotonic() < deadline:
        if metrics.exists() and pid_file.exists():
            steps = [json.loads(x)["step"] for x in metrics.read_text().splitlines()]
            if steps and steps[-1] >= at_step:
                killed["pid"], killed["at"] = int(pid_file.read_text()), steps[-1]
                os.kill(killed["pid"], signal.SIGKILL)
                return
        time.sleep(0.05)


def main(cases: dict = CASES, description: str = __doc__.splitlines()[0], result_file: str = "gpu-layouts.json") -> dict:
    """Run ``--cases`` of ``cases`` (name -> model, task, plan overrides, global batch, seq); a case named
    ``resume...`` has its rank-0 worker killed mid-run. Returns the results written to ``result_file``."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--tokenizer", type=Path)
    ap.add_argument("--build", type=Path, help="build_model.py (random weights from a config)")
    ap.add_argument("--models-dir", type=Path, default=Path("/var/tmp/models"))
    ap.add_argument("--cases", default=",".join(cases), help=f"Comma-separated, from: {', '.join(cases)}.")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--gpu", default="H100-80GB", help="The GPU type plans are made for (the machine's).")
    ap.add_argument("--compare", type=Path, help="A results file: measured against today's model; runs nothing.")
    a = ap.parse_args()
    if unknown := set(a.cases.split(",")) - set(cases):
        ap.error(f"--cases: unknown {', '.join(sorted(unknown))}; choose from {', '.join(cases)}")
    if a.compare:
        result = json.loads(a.compare.read_text())
        print_table(compare(result))
        return result
    if not (a.out and a.tokenizer and a.build):
        ap.error("--out, --tokenizer and --build are needed to measure")
    import ray

    from gpufleet.jobs.finetune import TRAIN_ENV, run

    a.out.mkdir(parents=True, exist_ok=True)
    data = Path("/var/tmp/chat.jsonl")
    synthetic_chat(data, 4000)
    env = {**TRAIN_ENV, **{k: os.environ[k] for k in ("PYTHONPATH", "TORCH_CUDA_ARCH_LIST", "NCCL_NVLS_ENABLE") if k in os.environ}}
    ray.init(runtime_env={"env_vars": env}, include_dashboard=False, logging_level="ERROR")
    gpu_name = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                              text=True).stdout.splitlines()[:1]
    results = {"gpu": gpu_name[0] if gpu_name else a.gpu, "planned_for": a.gpu, "ray": ray.__version__,
               "node_memory_gib": round(ray.cluster_resources().get("memory", 0) / GIB, 1), "rows": []}
    for name in a.cases.split(","):
        model, task, overrides, batch, seq = cases[name]
        t0 = time.monotonic()
        row: dict = dict(case=name, model=model, task=task, overrides=overrides, global_batch=batch, seq=seq)
        out = Path(f"/var/tmp/runs/{name}")
        try:
            model_dir = build(model, a.tokenizer, a.build, a.models_dir)
            resume = name.startswith("resume")
            steps = 30 if resume else a.steps
            spec = job_spec(a.out / f"{name}.yaml", name, model_dir, data, task, overrides, batch, seq, steps, out,
                            every=10 if resume else 10_000, failures=1 if resume else 0, gpu=a.gpu)
            killed: dict = {}
            if resume:
                threading.Thread(target=kill_when, args=(out, 13, killed), daemon=True).start()
            summary = run(spec)
            row.update(measured(out, model, task, seq, summary["layout"], a.gpu))
            if resume:
                row["killed_at_step"] = killed.get("at")
            row["status"] = "ok"
        except Exception as e:  # a refusal (host RAM, GPU memory) or a crash: keep its one line
            row["status"] = f"{type(e).__name__}: {str(e).splitlines()[0][:400]}"
            traceback.print_exc()
        row["wall_s"] = round(time.monotonic() - t0, 1)
        results["rows"].append(row)
        print(json.dumps(row), flush=True)
        (a.out / result_file).write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
