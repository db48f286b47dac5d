"""Measured DeepSpeed peaks (bench/train/results/*.json) beside the catalogue's plan; prints a table.

MFU is recomputed from the measured tokens/s with ``gpufleet.catalogue.flops`` so every file uses one
convention (PaLM's), whatever the script version that wrote it.
"""

from __future__ import annotations

import json
from pathlib import Path

from gpufleet.catalogue.flops import mfu, train_flops_per_token
from gpufleet.catalogue.gpus import get_gpu
from gpufleet.catalogue.memory import GIB, TrainSetup, estimate
from gpufleet.catalogue.model import load_model

RESULTS = Path(__file__).parent / "results"


def rows() -> list[dict]:
    out = []
    for f in sorted(RESULTS.glob("h100*.json")):
        for r in json.loads(f.read_text())["rows"]:
            if "measured_peak_gib" not in r:
                continue
            spec = load_model(r["model"])
            setup = TrainSetup(task=r["task"], micro_batch=r["micro_batch"], seq_len=r["seq"], grad_ckpt=r["grad_ckpt"],
                               engine="deepspeed", zero_stage=r["zero_stage"], grad_accum=r.get("grad_accum", 1),
                               compile=r.get("compile", False))
            pred = estimate(spec, setup).peak / GIB
            out.append({**r, "grad_accum": setup.grad_accum, "compile": setup.compile, "plan_gib": pred,
                        "error": (pred - r["measured_peak_gib"]) / r["measured_peak_gib"], "file": f.name,
                        "mfu": mfu(r["tokens_per_s"], train_flops_per_token(spec, r["seq"], r["task"]),
                                   get_gpu("H100-80GB").bf16_tflops)})
    return out


def main() -> None:
    print(f"{'model':14} {'task':5} {'ZeRO':>4} {'ckpt':>4} {'micro':>5} {'accum':>5} {'compile':>7} {'tok/s':>7} "
          f"{'MFU':>6} {'measured GiB':>12} {'plan GiB':>9} {'error':>7}")
    for r in rows():
        print(f"{r['model']:14} {r['task']:5} {r['zero_stage']:>4} {int(r['grad_ckpt']):>4} {r['micro_batch']:>5} "
              f"{r['grad_accum']:>5} {int(r['compile']):>7} {r['tokens_per_s']:>7.0f} {r['mfu']:>6.1%} "
              f"{r['measured_peak_gib']:>12.2f} {r['plan_gib']:>9.2f} {r['error']:>+7.1%}")


if __name__ == "__main__":
    main()
