"""Training throughput and memory on one GPU with DeepSpeed, beside the catalogue's prediction.

Runs what a gpufleet training worker runs (transformers model, the DeepSpeed config that
``jobs.layout.deepspeed_config`` generates, torch fused AdamW, bf16) in one process without
Ray, on random weights and random tokens, and records tokens/s, MFU against the GPU's bf16
peak, and ``torch.cuda.max_memory_allocated()`` beside ``cluster.memory.estimate`` for the same
layout. Writes JSON.

    python bench/train/gpu_train.py --out results.json [--model llama-3.2-1b] [--steps 12]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from cluster.gpus import GIB, get_gpu
from cluster.memory import TrainSetup, estimate
from cluster.spec import builtin_models, load_model
from jobs.layout import TrainLayout, deepspeed_config
from jobs.spec import JobSpec

CASES = [  # (task, zero_stage, grad_ckpt, micro_batch)
    ("full", 1, False, 4), ("full", 2, True, 8), ("lora", 0, False, 4),
]


def parse_cases(text: str) -> list[tuple[str, int, bool, int]]:
    """'full:2:ckpt:8,lora:0::4' -> [(task, zero_stage, grad_ckpt, micro_batch), ...]"""
    out = []
    for item in text.split(","):
        task, stage, ckpt, micro = item.split(":")
        out.append((task, int(stage), ckpt == "ckpt", int(micro)))
    return out


def run_case(name: str, task: str, stage: int, ckpt: bool, micro: int, seq: int, steps: int, gpu_name: str) -> dict:
    import deepspeed
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    cfg = AutoConfig.for_model(**json.loads(builtin_models()[name].read_text()))
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16, attn_implementation="sdpa")
    if ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if task == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"))
    model.train()
    spec = JobSpec(model=name, dataset="-", task=task, max_steps=steps, global_batch=micro, seq_len=seq, gpu=gpu_name)
    layout = TrainLayout(workers=1, use_gpu=True, zero_stage=stage, grad_ckpt=ckpt, micro_batch=micro, grad_accum=1,
                         dtype="bfloat16")
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-5, fused=True)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=trainable, optimizer=opt,
                                      config=deepspeed_config(layout, spec))
    ids = torch.randint(0, cfg.vocab_size, (micro, seq), device="cuda")
    times = []
    for _ in range(steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() - base
    step_s = sorted(times[3:])[len(times[3:]) // 2]  # median after warm-up
    spec_m = load_model(name)
    tok_s = micro * seq / step_s
    flops_per_token = (8 if ckpt else 6) * spec_m.num_params if task == "full" else (
        (8 if ckpt else 6) * spec_m.num_params * 2 / 3)  # LoRA skips the weight gradients: ~2/3 of the work
    predicted = estimate(spec_m, TrainSetup(task=task, precision="bf16", micro_batch=micro, seq_len=seq, grad_ckpt=ckpt,
                                            engine="deepspeed", zero_stage=stage, data_parallel=1)).peak
    del engine, model, opt
    torch.cuda.empty_cache()
    return {"model": name, "task": task, "zero_stage": stage, "grad_ckpt": ckpt, "micro_batch": micro, "seq": seq,
            "tokens_per_s": tok_s, "mfu": flops_per_token * tok_s / (get_gpu(gpu_name).bf16_tflops * 1e12),
            "measured_peak_gib": peak / GIB, "predicted_peak_gib": predicted / GIB,
            "peak_error": (predicted - peak) / peak, "step_time_s": step_s, "final_loss": float(loss)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", default="llama-3.2-1b")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--gpu", default="H100-80GB")
    ap.add_argument("--cases", help="task:zero:ckpt|:micro,... (default: the three in CASES)")
    args = ap.parse_args()
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29511")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    import deepspeed

    deepspeed.init_distributed(dist_backend="nccl")
    rows = []
    for task, stage, ckpt, micro in (parse_cases(args.cases) if args.cases else CASES):
        try:
            r = run_case(args.model, task, stage, ckpt, micro, args.seq, args.steps, args.gpu)
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            r = {"model": args.model, "task": task, "zero_stage": stage, "grad_ckpt": ckpt, "micro_batch": micro,
                 "status": "oom"}
        rows.append(r)
        print(json.dumps(r), flush=True)
        Path(args.out).write_text(json.dumps({"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
                                              "deepspeed": deepspeed.__version__, "rows": rows}, indent=1))
    print(f"{'task':5} {'ZeRO':>4} {'ckpt':>4} {'micro':>5} {'tok/s':>8} {'MFU':>6} {'peak GiB':>9} {'plan GiB':>9} {'err':>6}")
    for r in rows:
        if "tokens_per_s" in r:
            print(f"{r['task']:5} {r['zero_stage']:>4} {int(r['grad_ckpt']):>4} {r['micro_batch']:>5} "
                  f"{r['tokens_per_s']:>8.0f} {r['mfu']:>6.1%} {r['measured_peak_gib']:>9.2f} "
                  f"{r['predicted_peak_gib']:>9.2f} {r['peak_error']:>+6.1%}")


if __name__ == "__main__":
    main()
