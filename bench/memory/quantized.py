"""Measure bitsandbytes-quantized models on a GPU: generate() peaks (int8, nf4) and one QLoRA step.

Runs where torch, transformers, peft and bitsandbytes are installed. Each model is built with random
bf16 weights, saved (``--scratch``, a tmpfs is best) and loaded back the way a user loads it:
``from_pretrained(dir, quantization_config=BitsAndBytesConfig(...), device_map={"": 0})``. Per
quantization it records the weights (allocated after loading) and, per shape, the prefill and
generate() peaks (as ``generate.py`` does); for nf4 also one QLoRA training step
(``prepare_model_for_kbit_training`` with gradient checkpointing, peft LoRA r=16 on all linear
layers, torch AdamW): the peak of the second step. ``compare.py --quantized FILE`` puts the results
beside the plan (no GPU needed).

    python bench/memory/quantized.py --out quantized.json [--models a,b] [--scratch /dev/shm/q]
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import time
from pathlib import Path

import torch

from bench.memory.generate import build, case

MODELS = ["llama-3.2-1b", "qwen2.5-3b", "llama-3.1-8b", "gemma-2-2b"]
SHAPES = [(1, 2048, 128), (4, 1024, 256)]
QLORA_SHAPES = [(1, 2048), (4, 1024)]  # micro-batch, sequence


def bnb_config(quant: str):
    from transformers import BitsAndBytesConfig

    if quant == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
                              bnb_4bit_use_double_quant=False)


def fresh() -> int:
    gc.collect()
    torch.cuda.empty_cache()
    return torch.cuda.memory_allocated()


def load(path: Path, quant: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, quantization_config=bnb_config(quant), dtype=torch.bfloat16,
                                                device_map={"": 0}, attn_implementation="sdpa").eval()


def qlora_step(model, batch: int, seq: int, base: int) -> dict:
    vocab = model.config.get_text_config().vocab_size
    ids = torch.randint(3, vocab, (batch, seq), device="cuda")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    peaks = []
    for _ in range(2):
        torch.cuda.reset_peak_memory_stats()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        peaks.append(torch.cuda.max_memory_allocated() - base)
    del opt
    return dict(batch=batch, seq=seq, step_peak=peaks[-1], first_step_peak=peaks[0], loss=round(float(loss), 3))


def measure(name: str, scratch: Path, out: dict, write) -> None:
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    path = scratch / name
    base = fresh()
    model = build(name, torch.bfloat16)
    model.save_pretrained(path)
    del model
    for quant in ("nf4", "int8"):
        base = fresh()
        model = load(path, quant)
        weights = torch.cuda.memory_allocated() - base
        for b, p, n in SHAPES:
            try:
                rec = case(model, name, "bfloat16", b, p, n, base)
                rec.update(status="ok", weights=weights, quant=quant)
            except torch.OutOfMemoryError:
                rec = dict(model=name, quant=quant, batch=b, prompt=p, new_tokens=n, status="oom")
            out["generate"].append(rec)
            write(rec)
        if quant == "nf4":
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
            model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear",
                                                     task_type="CAUSAL_LM"))
            model.train()
            prepared = torch.cuda.memory_allocated() - base
            trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
            for b, s in QLORA_SHAPES:
                try:
                    rec = qlora_step(model, b, s, base)
                    rec.update(status="ok")
                except torch.OutOfMemoryError:
                    rec = dict(batch=b, seq=s, status="oom")
                rec.update(model=name, weights_loaded=weights, weights_prepared=prepared, trainable=trainable)
                out["qlora"].append(rec)
                write(rec)
        del model
    shutil.rmtree(path, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--scratch", type=Path, default=Path("/dev/shm/gpufleet-quant"))
    ap.add_argument("--budget-s", type=float, default=420, help="Stop starting new models after this long.")
    a = ap.parse_args()
    import bitsandbytes
    import peft
    import transformers

    out = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "transformers": transformers.__version__,
           "peft": peft.__version__, "bitsandbytes": bitsandbytes.__version__,
           "recipe": "bitsandbytes int8 / nf4 (no double quant, bf16 compute), generate() greedy SDPA; "
                     "QLoRA: prepare_model_for_kbit_training + gradient checkpointing, LoRA r=16 all-linear, AdamW",
           "generate": [], "qlora": []}

    def write(rec: dict) -> None:
        print(json.dumps(rec), flush=True)
        a.out.write_text(json.dumps(out, indent=1))

    t0 = time.monotonic()
    for name in a.models.split(","):
        if time.monotonic() - t0 > a.budget_s:
            out["stopped_early"] = f"budget of {a.budget_s:g}s reached before {name}"
            break
        try:
            measure(name, a.scratch, out, write)
        except Exception as e:  # keep what the other models gave
            out.setdefault("failed", []).append(f"{name}: {type(e).__name__}: {e}")
            write({"model": name, "failed": str(e)[:300]})
    a.out.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
