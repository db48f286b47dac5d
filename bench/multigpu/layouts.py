"""Training on several GPUs of one host, measured against the plan: Ray Train workers (one per GPU) running
DeepSpeed over NCCL through `gpufleet train`'s path (``bench.train.gpu_layouts``: per-GPU peak beside the
memory model's prediction, host RSS, tokens/s, MFU per GPU, a worker killed and resumed), plus the scaling
of each series run at several GPU counts.

A series is the cases that differ only in their ``-<N>gpu`` suffix: the same per-GPU layout (micro-batch,
ZeRO stage, offload, checkpointing) with the global batch growing with the GPUs (weak scaling), so the
efficiency at N GPUs is tokens/s per GPU at N over tokens/s per GPU at the fewest GPUs the series ran on.
Keep NVLink multicast off (``NCCL_NVLS_ENABLE=0``: the device tool's KINDS.md says why).

    device: NCCL_NVLS_ENABLE=0 bash bench/train/gpu_layouts.sh .gpu/train --multigpu --cases 3b-full-z2-1gpu,...
    here:   python -m bench.multigpu.layouts --compare bench/multigpu/results/h200x2-zero.json
    here:   python -m bench.multigpu.layouts --predict H100-80GB   # each case's layout and peak, before it runs
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from bench.train.gpu_layouts import kept_layout, predict
from bench.train.gpu_layouts import main as run_layouts
from gpufleet.catalogue.model import load_model
from gpufleet.jobs.layout import resolve_layout
from gpufleet.jobs.spec import JobSpec


def _weak(model: str, task: str, gpus: int, micro: int, seq: int = 2048, **layout: object) -> tuple:
    """A case whose per-GPU work stays fixed: ``micro`` sequences per GPU per step, no accumulation."""
    return model, task, {"workers": gpus, "micro_batch": micro, **layout}, micro * gpus, seq


CASES = {
    # measured on 2 x H200 (results/h200x2-zero.json): the plan's micro-batch, 16 x 2048 in all
    "1b-full-zero2-2gpu": ("llama-3.2-1b", "full", {"workers": 2, "zero_stage": 2}, 16, 2048),
    "1b-full-zero3-2gpu": ("llama-3.2-1b", "full", {"workers": 2, "zero_stage": 3}, 16, 2048),
    # weak-scaling series, each fits one H100 at 1 GPU (predicted 65.8 / 38.6 GiB; the 8B's host RAM at
    # 1 GPU is 143 GiB, which only the several-GPU machines have)
    **{f"3b-full-z2-{n}gpu": _weak("llama-3.2-3b", "full", n, 2, zero_stage=2, grad_ckpt=False) for n in (1, 2, 4)},
    **{f"8b-full-offload-{n}gpu": _weak("llama-3.1-8b", "full", n, 8, zero_stage=2, offload_optimizer=True,
                                        grad_ckpt=True) for n in (1, 2, 4)},
    # the plan's own layout for an 8B full fine-tune on four GPUs, and ZeRO-3 (82 GiB per GPU at two: H200 only)
    "8b-full-4gpu": ("llama-3.1-8b", "full", {"workers": 4}, 16, 2048),
    **{f"8b-full-z3-{n}gpu": _weak("llama-3.1-8b", "full", n, 4, zero_stage=3, offload_optimizer=False, grad_ckpt=True)
       for n in (2, 4)},
    "8b-full-z3-offload-2gpu": _weak("llama-3.1-8b", "full", 2, 4, zero_stage=3, offload_optimizer=True,
                                     grad_ckpt=True),
    "8b-lora-z3-2gpu": _weak("llama-3.1-8b", "lora", 2, 4, zero_stage=3, offload_optimizer=False, grad_ckpt=True),
    # rank 0 killed mid-run on a GPU: the job resumes from its last checkpoint on both workers
    "resume-2gpu": ("llama-3.2-1b", "lora", {"workers": 2}, 8, 1024),
}


def scaling(rows: list[dict]) -> list[dict]:
    """Per series that ran at more than one GPU count: tokens/s per GPU and the efficiency against the
    fewest GPUs it ran on."""
    series: dict[str, dict[int, float]] = {}
    for r in rows:
        m = re.fullmatch(r"(.+)-(\d+)gpu", r["case"])
        if m and r.get("status") == "ok":
            series.setdefault(m[1], {})[int(m[2])] = r["tokens_per_s"] / int(m[2])
    out = []
    for name, per_gpu in series.items():
        if len(per_gpu) < 2:
            continue
        base_n = min(per_gpu)
        for n in sorted(per_gpu):
            out.append({"series": name, "gpus": n, "tokens_per_s_per_gpu": round(per_gpu[n]),
                        "efficiency": round(per_gpu[n] / per_gpu[base_n], 3), "against_gpus": base_n})
    return out


def print_scaling(rows: list[dict]) -> None:
    for r in rows:
        print(f"{r['series']:<20} {r['gpus']} GPU  {r['tokens_per_s_per_gpu']:>8} tok/s per GPU  "
              f"efficiency {r['efficiency']:.1%} (against {r['against_gpus']} GPU)")


def predictions(gpu: str) -> dict[str, dict]:
    """Each case's layout as `gpufleet train` resolves it for ``gpu`` and the memory model's peaks for it
    (the numbers a run is compared with), or the one-line refusal."""
    out: dict[str, dict] = {}
    for name, (model, task, overrides, batch, seq) in CASES.items():
        job = JobSpec(model="m", dataset="d", task=task, max_steps=1, gpu=gpu, global_batch=batch, seq_len=seq,
                      plan=overrides)
        try:
            layout = resolve_layout(job, load_model(model))
        except Exception as e:  # noqa: BLE001 - a refusal is a prediction too
            out[name] = {"refused": str(e)}
            continue
        kept = kept_layout(layout.model_dump())
        out[name] = {"layout": kept, **predict(model, task, seq, kept)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(add_help=False)
    ap.add_argument("--predict", metavar="GPU", help="Print each case's planned layout and predicted peaks; run nothing.")
    ap.add_argument("--predict-out", type=Path, help="With --predict: also write them to this JSON file.")
    a, rest = ap.parse_known_args()
    if a.predict:
        got = predictions(a.predict)
        for name, p in got.items():
            print(f"{name:<26} " + (p["refused"] if "refused" in p else
                                    f"{p['predicted_peak_gib']:>6.2f} GiB GPU  {p['predicted_host_gib']:>6.1f} GiB host  "
                                    f"{p['layout']}"))
        if a.predict_out:
            a.predict_out.write_text(json.dumps({"gpu": a.predict, "cases": got}, indent=1))
        return
    sys.argv = [sys.argv[0], *rest]
    result = run_layouts(CASES, __doc__.splitlines()[0], "multigpu.json")
    if result:
        print_scaling(scaling(result["rows"]))


if __name__ == "__main__":
    main()
