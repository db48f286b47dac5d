"""Training throughput and memory on one GPU with DeepSpeed, beside the catalogue's prediction.

Runs what a gpufleet training worker runs (transformers model, the DeepSpeed config that
``gpufleet.jobs.layout.deepspeed_config`` generates, torch fused AdamW, bf16, ``engine.compile()`` where
the case asks) in one process without Ray, on random weights and random tokens, and records
tokens/s, MFU (``gpufleet.catalogue.flops``: PaLM's convention) against the GPU's bf16 peak, and
``torch.cuda.max_memory_allocated()`` beside ``gpufleet.catalogue.memory.estimate`` for the same layout,
plus the allocator peak of each phase (forward, backward, optimizer step) of one extra step and
the predicted terms beside them. ``offload`` cases use the DeepSpeed config's CPU Adam (ZeRO-Offload)
and also record the host side: the process's RSS after each stage and torch's pinned host
allocator (``torch.cuda.host_memory_stats``: power-of-two blocks). Writes JSON.

    python bench/train/gpu_train.py --out results.json [--model llama-3.2-1b] [--steps 12] \
        [--cases full:1::4:8:compile,lora:0::4,full:2:ckpt:16:1:compile:offload]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from gpufleet.catalogue.flops import mfu, train_flops_per_token
from gpufleet.catalogue.gpus import GIB, get_gpu
from gpufleet.catalogue.memory import TrainSetup, estimate, host_peak
from gpufleet.catalogue.model import builtin_models, load_model
from gpufleet.catalogue.placement import Placement
from gpufleet.jobs.layout import TrainLayout, deepspeed_config
from gpufleet.jobs.spec import JobSpec

# task, zero_stage, grad_ckpt, micro_batch, grad_accum, compile, offload_optimizer
Case = tuple[str, int, bool, int, int, bool, bool]
CASE_FIELDS = ("task", "zero_stage", "grad_ckpt", "micro_batch", "grad_accum", "compile", "offload_optimizer")
CASES: list[Case] = [
    ("full", 1, False, 4, 1, False, False), ("full", 2, True, 8, 1, False, False),
    ("lora", 0, False, 4, 1, False, False),
]


def parse_cases(text: str) -> list[Case]:
    """'full:2:ckpt:8,lora:0::4:8:compile,full:2:ckpt:16:1:compile:offload' -> [Case, ...]"""
    out = []
    for item in text.split(","):
        task, stage, ckpt, micro, *rest = item.split(":")
        accum = int(rest[0]) if rest and rest[0] else 1
        out.append((task, int(stage), ckpt == "ckpt", int(micro), accum, "compile" in rest[1:], "offload" in rest[1:]))
    return out


def host_now() -> dict[str, float]:
    """This process's resident memory (current and high-water mark) and torch's pinned host pool."""
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    out = {k: round(int(status[f"Vm{k.upper()}"].split()[0]) / 2**20, 3) for k in ("rss", "hwm")}  # kB -> GiB
    pinned = torch.cuda.host_memory_stats() if torch.cuda.is_available() and hasattr(torch.cuda, "host_memory_stats") else {}
    out["pinned"] = round(pinned.get("allocated_bytes.current", 0) / GIB, 3)
    out["pinned_peak"] = round(pinned.get("allocated_bytes.peak", 0) / GIB, 3)
    out["pinned_blocks"] = pinned.get("allocations.current", 0)
    return out


class PinLog:
    """Every ``Tensor.pin_memory`` call while active (DeepSpeed pins through it), by call site and
    stage: how many, their bytes, and the bytes torch's host allocator reserves for them (each
    allocation rounded up to a power of two)."""

    def __init__(self) -> None:
        self.stage = "init"
        self.sites: dict[str, dict[str, float]] = {}
        self._orig = torch.Tensor.pin_memory

    def __enter__(self) -> PinLog:
        import traceback

        log, orig = self, self._orig

        def pin_memory(t: torch.Tensor, *a, **k) -> torch.Tensor:
            # the innermost caller in DeepSpeed (or torch) outside DeepSpeed's accelerator shim
            frames = [f for f in traceback.extract_stack()[:-1]
                      if ("deepspeed" in f.filename or "torch/" in f.filename) and "accelerator" not in f.filename]
            where = f"{Path(frames[-1].filename).name}:{frames[-1].lineno} {frames[-1].name}" if frames else "other"
            n = t.numel() * t.element_size()
            row = log.sites.setdefault(f"{log.stage} {where}", {"calls": 0, "gib": 0.0, "pinned_gib": 0.0})
            row["calls"] += 1
            row["gib"] += n / GIB
            row["pinned_gib"] += (1 << max(n - 1, 0).bit_length()) / GIB
            return orig(t, *a, **k)

        torch.Tensor.pin_memory = pin_memory
        return self

    def __exit__(self, *exc) -> None:
        torch.Tensor.pin_memory = self._orig

    def summary(self) -> dict[str, dict[str, float]]:
        return {k: {kk: round(vv, 3) for kk, vv in v.items()} for k, v in self.sites.items()}


def _micro_step(engine, ids) -> torch.Tensor:
    loss = engine(input_ids=ids, labels=ids).loss
    engine.backward(loss)
    engine.step()
    return loss


def _phase_peaks(engine, ids, accum: int, base: int) -> dict[str, float]:
    """Allocator peaks (and live bytes) around forward, backward and step of the last micro-batch
    of one more step, relative to ``base``."""
    for _ in range(accum - 1):
        _micro_step(engine, ids)
    torch.cuda.synchronize()

    def gib(n: int) -> float:
        return round((n - base) / GIB, 3)

    out = {"before_forward_gib": gib(torch.cuda.memory_allocated())}
    torch.cuda.reset_peak_memory_stats()
    loss = engine(input_ids=ids, labels=ids).loss
    out |= {"forward_gib": gib(torch.cuda.max_memory_allocated()), "after_forward_gib": gib(torch.cuda.memory_allocated())}
    torch.cuda.reset_peak_memory_stats()
    engine.backward(loss)
    out |= {"backward_gib": gib(torch.cuda.max_memory_allocated()), "after_backward_gib": gib(torch.cuda.memory_allocated())}
    torch.cuda.reset_peak_memory_stats()
    engine.step()
    out |= {"step_gib": gib(torch.cuda.max_memory_allocated()), "after_step_gib": gib(torch.cuda.memory_allocated())}
    return out


TRACED_OWNERS = ("deepspeed/", "transformers/", "bench/train", "torch/autograd", "_inductor/")


def _site(frames: list[dict]) -> str:
    """Who asked for a traced allocation: the innermost frame in DeepSpeed, transformers, autograd or
    inductor; every graph inductor generated counts as one owner (its files are per-graph hashes)."""
    for f in frames:
        name = f.get("filename", "")
        if "torchinductor" in name:
            return "inductor-generated code"
        if any(k in name for k in TRACED_OWNERS):
            return f"{Path(name).parent.name}/{Path(name).name}:{f.get('line')} {f.get('name')}"
    return "other"


def traced_peak(fn) -> dict:
    """Run ``fn`` under torch's allocation trace and return what was live at its allocator peak,
    grouped by the allocating call site (bytes allocated before the trace began: ``untraced``)."""
    torch.cuda.synchronize()
    untraced = torch.cuda.memory_allocated()
    torch.cuda.memory._record_memory_history(max_entries=2_000_000, stacks="python")
    try:
        fn()
        torch.cuda.synchronize()
        snap = torch.cuda.memory._snapshot()
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    live: dict[int, tuple[int, str]] = {}
    now = best = 0
    best_live: dict[int, tuple[int, str]] = {}
    for e in snap["device_traces"][0]:
        if e["action"] == "alloc":
            live[e["addr"]] = (e["size"], _site(e.get("frames", [])))
            now += e["size"]
            if now > best:
                best, best_live = now, dict(live)
        elif e["action"] == "free_completed" and e["addr"] in live:  # the allocator's own accounting point
            now -= live.pop(e["addr"])[0]
    groups: dict[str, float] = {}
    for size, site in best_live.values():
        groups[site] = groups.get(site, 0) + size / GIB
    top = dict(sorted(((k, round(v, 3)) for k, v in groups.items()), key=lambda kv: -kv[1])[:15])
    return {"untraced_gib": round(untraced / GIB, 3), "traced_peak_gib": round(best / GIB, 3), "live_at_peak": top}


def run_case(name: str, case: Case, seq: int, steps: int, gpu_name: str) -> dict:
    import deepspeed
    from transformers import AutoConfig, AutoModelForCausalLM

    task, stage, ckpt, micro, accum, compiled, offload = case
    host = {"start": host_now()}
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
    host["model_built"] = host_now()
    spec = JobSpec(model=name, dataset="-", task=task, max_steps=steps, global_batch=micro * accum, seq_len=seq,
                   gpu=gpu_name)
    layout = TrainLayout(placement=Placement(bundles=[{"CPU": 1, "GPU": 1}], strategy="PACK"), zero_stage=stage, grad_ckpt=ckpt, micro_batch=micro,
                         grad_accum=accum, dtype="bfloat16", compile=compiled,
                         offload_optimizer=offload)
    trainable = [p for p in model.parameters() if p.requires_grad]
    # ZeRO-Offload: the config names DeepSpeed's CPU Adam (as gpufleet's jobs do); else torch's fused AdamW
    opt = None if offload else torch.optim.AdamW(trainable, lr=1e-5, fused=True)
    with PinLog() as pins:
        engine, *_ = deepspeed.initialize(model=model, model_parameters=trainable, optimizer=opt,
                                          config=deepspeed_config(layout, spec))
        host["initialized"] = host_now()
        if compiled:
            engine.compile()
        ids = torch.randint(0, cfg.vocab_size, (micro, seq), device="cuda")
        times = []
        for i in range(steps):
            pins.stage = f"step{i + 1}" if i < 2 else "later"
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(accum):
                loss = _micro_step(engine, ids)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
            if i < 2:
                host[f"step{i + 1}"] = host_now()
        peak = torch.cuda.max_memory_allocated() - base
        phases = _phase_peaks(engine, ids, accum, base)
        if os.environ.get("GPU_TRAIN_TRACE"):  # one more optimizer step, traced
            def one_step(engine=engine) -> None:
                for _ in range(accum):
                    _micro_step(engine, ids)

            phases["traced_step"] = traced_peak(one_step)
        host["end"] = host_now()
    host["pin_memory_calls"] = pins.summary()
    step_s = sorted(times[3:])[len(times[3:]) // 2]  # median after warm-up (and compilation)
    spec_m = load_model(name)
    tok_s = micro * accum * seq / step_s
    setup = TrainSetup(task=task, dtype="bfloat16", micro_batch=micro, seq_len=seq, grad_ckpt=ckpt,
                       engine="deepspeed", zero_stage=stage, data_parallel=1, grad_accum=accum, compile=compiled,
                       offload_optimizer=offload)
    breakdown = estimate(spec_m, setup)
    predicted = breakdown.peak
    del engine, model, opt
    torch.cuda.empty_cache()
    return {"model": name, "task": task, "zero_stage": stage, "grad_ckpt": ckpt, "micro_batch": micro,
            "grad_accum": accum, "compile": compiled, "offload_optimizer": offload, "seq": seq, "tokens_per_s": tok_s,
            "mfu": mfu(tok_s, train_flops_per_token(spec_m, seq, task), get_gpu(gpu_name).bf16_tflops),
            "measured_peak_gib": peak / GIB, "predicted_peak_gib": predicted / GIB,
            "peak_error": (predicted - peak) / peak, "step_time_s": step_s, "final_loss": float(loss.detach()),
            "phase_peaks": phases, "predicted": breakdown.as_gib(), "host_gib": host,
            "predicted_host_gib": round(host_peak(spec_m, setup, breakdown) / GIB, 3)}


def _one_case(args: argparse.Namespace) -> dict:
    """Run one case in this (fresh) process: compiled graphs and DeepSpeed state of an earlier
    case would otherwise stay on the GPU and skew the next case's peak."""
    import deepspeed

    os.environ.update(MASTER_ADDR="127.0.0.1", RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    os.environ.setdefault("MASTER_PORT", "29511")
    deepspeed.init_distributed(dist_backend="nccl")
    case = parse_cases(args.one)[0]
    try:
        return run_case(args.model, case, args.seq, args.steps, args.gpu)
    except torch.OutOfMemoryError:
        return dict(zip(CASE_FIELDS, case, strict=True), model=args.model, status="oom")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", default="llama-3.2-1b")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--gpu", default="H100-80GB")
    ap.add_argument("--cases", help="task:zero:ckpt|:micro[:accum[:compile]],... (default: the three in CASES)")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one case, write its row to --out
    args = ap.parse_args()
    if args.one:
        Path(args.out).write_text(json.dumps(_one_case(args)))
        return
    import subprocess
    import sys
    import tempfile

    import deepspeed

    cases = args.cases.split(",") if args.cases else [
        f"{t}:{z}:{'ckpt' if c else ''}:{m}:{a}:{'compile' if k else ''}:{'offload' if o else ''}"
        for t, z, c, m, a, k, o in CASES]
    rows = []
    for i, case in enumerate(cases):
        with tempfile.NamedTemporaryFile(suffix=".json") as f:
            cmd = [sys.executable, __file__, "--one", case, "--out", f.name, "--model", args.model,
                   "--seq", str(args.seq), "--steps", str(args.steps), "--gpu", args.gpu]
            proc = subprocess.run(cmd, env={**os.environ, "MASTER_PORT": str(29511 + i)})
            text = Path(f.name).read_text()
        r = json.loads(text) if text else {"model": args.model, "case": case, "status": f"exit {proc.returncode}"}
        rows.append(r)
        print(json.dumps(r), flush=True)
        Path(args.out).write_text(json.dumps({"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
                                              "deepspeed": deepspeed.__version__, "rows": rows}, indent=1))
    print(f"{'task':5} {'ZeRO':>4} {'ckpt':>4} {'micro':>5} {'accum':>5} {'compile':>7} {'tok/s':>8} {'MFU':>6} "
          f"{'peak GiB':>9} {'plan GiB':>9} {'err':>6}")
    for r in rows:
        if "tokens_per_s" in r:
            print(f"{r['task']:5} {r['zero_stage']:>4} {int(r['grad_ckpt']):>4} {r['micro_batch']:>5} "
                  f"{r['grad_accum']:>5} {int(r['compile']):>7} "
                  f"{r['tokens_per_s']:>8.0f} {r['mfu']:>6.1%} {r['measured_peak_gib']:>9.2f} "
                  f"{r['predicted_peak_gib']:>9.2f} {r['peak_error']:>+6.1%}")


if __name__ == "__main__":
    main()
