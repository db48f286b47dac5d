"""The plan's decode speed beside a serving benchmark: predicted time per output token against the
median TPOT `vllm bench serve` measured at each concurrency (plain vLLM and gpufleet's endpoint).

    python -m bench.serve.decode_speed [bench/serve/results/h100-serve.json] [--json]

The overheads in ``gpufleet.catalogue.serving.decode_step_s`` were read off this same file (Llama-3.2-1B), so the
table shows a calibration, not a held-out check; at concurrency 256 vLLM queues and interleaves prefills,
which a decode-only model does not count.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from gpufleet.catalogue.gpus import get_gpu
from gpufleet.catalogue.model import load_model
from gpufleet.catalogue.quantization import FP8
from gpufleet.catalogue.serving import decode_step_s, serving_memory

DEFAULT = Path(__file__).parent / "results" / "h100-serve.json"


TOKENS = 256  # the workload: 128 prompt + 128 output tokens


def predicted_tpot_ms(model: str, engine: dict, concurrency: int, gpu: str = "H100-80GB") -> float:
    """The plan's decode step for a replica run with vLLM ``engine`` arguments, at ``concurrency``."""
    spec = load_model(model)
    fp8 = engine.get("quantization") == "fp8"
    mem = serving_memory(spec, get_gpu(gpu), tp=engine["tensor_parallel_size"], context=engine["max_model_len"],
                         gpu_memory_utilization=engine["gpu_memory_utilization"], max_num_seqs=engine["max_num_seqs"],
                         max_num_batched_tokens=engine["max_num_batched_tokens"], expected_tokens=TOKENS,
                         linear_bytes=spec.linear_bytes_per_weight(FP8) if fp8 else None,
                         kv_dtype_bytes=1 if engine.get("kv_cache_dtype") == "fp8" else None)
    return decode_step_s(spec, get_gpu(gpu), mem, concurrency, fp8_matmul=fp8) * 1000


def rows(result: dict, gpu: str = "H100-80GB") -> list[dict]:
    """One row per concurrency of the first run of each side: measured and predicted TPOT (ms)."""
    model, e = result["model"].split()[0], result["engine_kwargs"]
    first = {}
    for side in result["sides"]:
        first.setdefault(side["side"], {lv["concurrency"]: lv for lv in side["levels"]})
    out = []
    for c in sorted(first["plain"]):
        predicted = predicted_tpot_ms(model, e, c, gpu)
        row = {"concurrency": c, "predicted_tpot_ms": round(predicted, 2)}
        for name, levels in first.items():
            measured = levels[c]["median_tpot_ms"]
            row[f"{name}_tpot_ms"] = round(measured, 2)
            row[f"{name}_error"] = round(predicted / measured - 1, 3)
        out.append(row)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("result", nargs="?", type=Path, default=DEFAULT)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    table = rows(json.loads(a.result.read_text()))
    if a.json:
        print(json.dumps(table, indent=1))
        return
    print(f"{'concurrency':>11} {'predicted':>10} {'plain':>8} {'error':>7} {'gpufleet':>9} {'error':>7}   (TPOT, ms)")
    for r in table:
        print(f"{r['concurrency']:>11} {r['predicted_tpot_ms']:>10} {r['plain_tpot_ms']:>8} {r['plain_error']:>+7.1%} "
              f"{r.get('gpufleet_tpot_ms', '-'):>9} {r.get('gpufleet_error', 0):>+7.1%}")


if __name__ == "__main__":
    main()
