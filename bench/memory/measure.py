"""Measure real GPU peak memory of the catalogue's single-GPU reference recipe.

Runs on a CUDA machine with only torch, transformers and peft installed (no gpufleet install
needed): it reads the built-in configs from ``catalogue/models/*.json``, builds each model with
random weights directly on the GPU, runs two optimizer steps and records
``torch.cuda.max_memory_allocated()`` minus what was allocated before the model was built,
plus the same number for each phase (forward, backward, optimizer step) so the memory model
can be checked piece by piece. Results go to a JSON file; ``compare.py`` puts them beside
``gpufleet estimate``.

The recipe (the contract of ``gpufleet estimate``):
  SDPA attention, ``use_cache=False``, labels = input_ids, ``torch.optim.AdamW`` defaults.
  infer      bf16 weights, one forward under ``no_grad``.
  lora       bf16 frozen base, peft LoRA r=16 alpha=32 all-linear (adapters fp32).
  full-bf16  all parameters bf16.
  full-mixed fp32 parameters, forward under ``torch.autocast(bfloat16)``.
  +ckpt      ``gradient_checkpointing_enable(use_reentrant=False)``.

Usage: python bench/memory/measure.py --out results.json [--models a,b] [--shapes 1x1024,4x2048]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import time
from pathlib import Path

import torch

MODELS_DIR = Path(__file__).resolve().parents[2] / "catalogue" / "models"
DEFAULT_MODELS = [
    "qwen2.5-0.5b", "llama-3.2-1b", "gemma-3-1b", "qwen2.5-1.5b", "gemma-2-2b", "llama-3.2-3b",
    "qwen2.5-3b", "phi-3-mini-4k", "qwen2.5-7b", "mistral-7b-v0.3", "llama-3.1-8b", "qwen3-8b",
    "gemma-2-9b",
]
RECIPES = [
    ("infer", False), ("lora", False), ("lora", True), ("full-bf16", False), ("full-bf16", True),
    ("full-mixed", False), ("full-mixed", True),
]
GIB = 2**30


def build(name: str, recipe: str, ckpt: bool):
    from transformers import AutoConfig, AutoModelForCausalLM

    raw = json.loads((MODELS_DIR / f"{name}.json").read_text())
    cfg = AutoConfig.for_model(**raw)
    cfg._attn_implementation = "sdpa"
    dtype = torch.float32 if recipe == "full-mixed" else torch.bfloat16
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="sdpa")
    n_params = sum(p.numel() for p in model.parameters())
    if recipe == "infer":
        model.eval()
        return model, n_params, []
    model.train()
    if ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if recipe == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear",
                                                 task_type="CAUSAL_LM"))
    trainable = [p for p in model.parameters() if p.requires_grad]
    return model, n_params, trainable


def run_case(name: str, recipe: str, ckpt: bool, batch: int, seq: int) -> dict:
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    rec: dict = dict(model=name, recipe=recipe, grad_ckpt=ckpt, batch=batch, seq=seq, status="ok")
    phases: dict[str, int] = {}
    phase = "build"
    model = opt = None
    t0 = time.perf_counter()

    def mark(label: str) -> None:
        phases[label + "_peak"] = torch.cuda.max_memory_allocated() - base
        phases[label + "_after"] = torch.cuda.memory_allocated() - base
        torch.cuda.reset_peak_memory_stats()

    try:
        model, n_params, trainable = build(name, recipe, ckpt)
        rec["n_params"] = n_params
        rec["n_trainable"] = sum(p.numel() for p in trainable)
        mark("build")
        vocab = model.config.vocab_size if hasattr(model.config, "vocab_size") else model.get_base_model().config.vocab_size
        gen = torch.Generator(device="cuda").manual_seed(0)
        ids = torch.randint(0, vocab, (batch, seq), device="cuda", generator=gen)
        mark("inputs")
        if recipe == "infer":
            phase = "forward"
            with torch.no_grad():
                out = model(input_ids=ids, labels=ids, use_cache=False)
            torch.cuda.synchronize()
            del out
            mark("forward")
        else:
            opt = torch.optim.AdamW(trainable)
            for step in (1, 2):
                phase = f"forward{step}"
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=recipe == "full-mixed"):
                    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
                mark(phase)
                phase = f"backward{step}"
                loss.backward()
                rec[f"loss{step}"] = float(loss.detach())
                del loss
                mark(phase)
                phase = f"step{step}"
                opt.step()
                opt.zero_grad(set_to_none=True)
                torch.cuda.synchronize()
                mark(phase)
        rec["peak_bytes"] = max(v for k, v in phases.items() if k.endswith("_peak"))
    except torch.OutOfMemoryError:
        rec["status"] = "oom"
        rec["oom_phase"] = phase
    rec["phases"] = phases
    rec["seconds"] = round(time.perf_counter() - t0, 2)
    del model, opt
    gc.collect()
    torch.cuda.empty_cache()
    return rec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--models", default=",".join(DEFAULT_MODELS))
    ap.add_argument("--shapes", default="1x1024,4x2048")
    args = ap.parse_args()
    import transformers

    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
    props = torch.cuda.get_device_properties(0)
    meta = dict(gpu=props.name, gpu_total_bytes=props.total_memory, torch=torch.__version__,
                transformers=transformers.__version__, python=platform.python_version(),
                cuda=torch.version.cuda)
    results = []
    out = Path(args.out)
    for name in args.models.split(","):
        for recipe, ckpt in RECIPES:
            if recipe == "infer" and ckpt:
                continue
            for batch, seq in shapes:
                rec = run_case(name, recipe, ckpt, batch, seq)
                results.append(rec)
                peak = rec.get("peak_bytes")
                print(f"{name:18s} {recipe:10s} ckpt={int(ckpt)} {batch}x{seq:<5d} {rec['status']:4s} "
                      f"peak={peak / GIB if peak else float('nan'):7.2f} GiB  {rec['seconds']:5.1f}s", flush=True)
                out.write_text(json.dumps(dict(meta=meta, results=results), indent=1))
    print("wrote", out, len(results), "cases", os.path.getsize(out), "bytes")


if __name__ == "__main__":
    main()
