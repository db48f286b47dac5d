"""Measure the GPU peak of transformers' ``generate()`` (the `--task generate` recipe) on a GPU.

Runs where only torch and transformers are installed: reads ``catalogue/models/*.json``, builds
each model with random weights on the GPU (SDPA attention), and for each shape (batch x prompt
tokens x new tokens) records, above what was allocated before: the weights, the peak of the
prefill alone (one forward over the prompt with the KV cache on, logits for the last position
only, as ``generate`` runs it) and the peak of the whole greedy ``generate`` (exactly ``new``
tokens: ``min_new_tokens`` = ``max_new_tokens``). ``compare.py --generate`` puts the results
beside the plan's ``generate_memory`` (``--compare FILE``: no GPU needed; prints the table and the
median and worst error).

    python bench/memory/generate.py --out generate.json [--models a,b] [--budget-s 480]
    python bench/memory/generate.py --compare bench/memory/results/h100-generate.json
    python bench/memory/generate.py --compare bench/memory/results/h100-quantized.json  (bitsandbytes rows)
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path

import torch

MODELS_DIR = Path(__file__).resolve().parents[2] / "catalogue" / "models"
MODELS = ["qwen2.5-0.5b", "llama-3.2-1b", "gemma-3-1b", "gemma-2-2b", "llama-3.2-3b", "phi-3-mini-4k",
          "qwen2.5-7b", "mistral-7b-v0.3", "llama-3.1-8b", "qwen3-8b", "gemma-2-9b"]
SHAPES = [(1, 2048, 128), (4, 1024, 256), (16, 256, 64)]  # batch, prompt tokens, new tokens
FP16_SHAPES = [(4, 1024, 256)]


def build(name: str, dtype: torch.dtype):
    from transformers import AutoConfig, AutoModelForCausalLM

    raw = json.loads((MODELS_DIR / f"{name}.json").read_text())
    cfg = AutoConfig.for_model(**raw)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="sdpa")
    return model.eval()


def case(model, name: str, dtype: str, batch: int, prompt: int, new: int, base: int) -> dict:
    vocab = model.config.get_text_config().vocab_size
    ids = torch.randint(3, vocab, (batch, prompt), device="cuda")
    mask = torch.ones_like(ids)
    rec = dict(model=name, dtype=dtype, batch=batch, prompt=prompt, new_tokens=new)
    with torch.no_grad():
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        model(input_ids=ids, attention_mask=mask, use_cache=True, logits_to_keep=1)
        rec["prefill_peak"] = torch.cuda.max_memory_allocated() - base
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                             do_sample=False, use_cache=True, pad_token_id=0)
        rec["generate_s"] = round(time.perf_counter() - t0, 2)
        rec["generate_peak"] = torch.cuda.max_memory_allocated() - base
        rec["generated"] = int(out.shape[1] - prompt)
    return rec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path)
    ap.add_argument("--compare", type=Path, help="Put a results file beside the memory model; measure nothing.")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--budget-s", type=float, default=480, help="Stop starting new models after this long.")
    ap.add_argument("--shapes", help="BATCHxPROMPT+NEW,... (default: the calibration shapes; bf16 and fp16 alike)")
    a = ap.parse_args()
    if a.compare:
        compare(a.compare)
        return
    import transformers

    t_start = time.monotonic()
    result = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
              "transformers": transformers.__version__, "recipe": "generate(), greedy, SDPA, DynamicCache",
              "rows": []}
    plan = (("bfloat16", SHAPES), ("float16", FP16_SHAPES))
    if a.shapes:
        given = [tuple(int(x) for x in s.replace("+", "x").split("x")) for s in a.shapes.split(",")]
        plan = (("bfloat16", given[:-1] or given), ("float16", given[-1:]))
    for name in a.models.split(","):
        for dtype, shapes in plan:
            if time.monotonic() - t_start > a.budget_s:
                result["stopped_early"] = f"budget of {a.budget_s:g}s reached before {name} {dtype}"
                break
            gc.collect()
            torch.cuda.empty_cache()
            base = torch.cuda.memory_allocated()
            try:
                model = build(name, getattr(torch, dtype))
            except Exception as e:
                result["rows"].append(dict(model=name, dtype=dtype, status=f"build failed: {type(e).__name__}: {e}"))
                continue
            weights = torch.cuda.memory_allocated() - base
            for b, p, n in shapes:
                if p + n > model.config.get_text_config().max_position_embeddings:
                    continue
                try:
                    rec = case(model, name, dtype, b, p, n, base)
                    rec.update(status="ok", weights=weights)
                except torch.OutOfMemoryError:
                    rec = dict(model=name, dtype=dtype, batch=b, prompt=p, new_tokens=n, status="oom")
                result["rows"].append(rec)
                print(json.dumps(rec), flush=True)
                a.out.write_text(json.dumps(result, indent=1))
            del model
    a.out.write_text(json.dumps(result, indent=1))


def compare(path: Path) -> None:
    """Measured generate() peaks beside ``gpufleet.catalogue.memory.generate_memory``, in GiB."""
    import statistics
    import sys

    sys.path.insert(0, str(MODELS_DIR.parents[1]))
    from gpufleet.catalogue.memory import generate_memory
    from gpufleet.catalogue.model import load_model
    from gpufleet.catalogue.quantization import bitsandbytes

    errors = []
    data = json.loads(path.read_text())
    print(f"{'model':<16}{'dtype':<10}{'shape':>16}{'measured':>10}{'predicted':>10}{'error':>8}  phase")
    for r in data.get("rows", data.get("generate", [])):
        if r.get("status") != "ok":
            continue
        quant = r.get("quant", "none")
        m = generate_memory(load_model(r["model"]), r["batch"], r["prompt"], r["new_tokens"],
                            quant=bitsandbytes(quant))
        err = m.peak / r["generate_peak"] - 1
        errors.append(abs(err))
        shape = f"{r['batch']}x{r['prompt']}+{r['new_tokens']}"
        dtype = r["dtype"] if quant == "none" else quant
        print(f"{r['model']:<16}{dtype:<10}{shape:>16}{r['generate_peak'] / 2**30:>10.3f}"
              f"{m.peak / 2**30:>10.3f}{err:>+8.1%}  {m.peak_phase}")
    print(f"{len(errors)} cases: median |error| {statistics.median(errors):.1%}, worst {max(errors):.1%}")


if __name__ == "__main__":
    main()
