"""Predicted training throughput and the GPU-hours objective: the plan trades GPUs for time only where the
committed GPU runs say it pays."""

import json
import math
from pathlib import Path

import pytest

from gpufleet.catalogue.errors import PlanError
from gpufleet.catalogue.gpus import get_gpu
from gpufleet.catalogue.model import load_model
from gpufleet.catalogue.planner import plan
from gpufleet.catalogue.throughput import step_seconds, tokens_per_second

RESULTS = Path(__file__).parents[1] / "bench" / "train" / "results"


def measured_runs() -> list[dict]:
    """Every committed single-GPU training run with a layout and a measured rate."""
    runs = []
    for path in sorted(RESULTS.glob("*.json")):
        data = json.loads(path.read_text())
        for r in data.get("rows") or data.get("results") or []:
            if not isinstance(r, dict) or "tokens_per_s" not in r or r.get("status", "ok") != "ok":
                continue
            layout = r.get("layout") or r
            micro = layout["micro_batch"]
            global_batch = r.get("global_batch") or micro * (layout.get("grad_accum") or 1)
            compiled = layout.get("compile")
            runs.append({"file": path.name, "model": r["model"], "task": r["task"], "seq": r.get("seq") or r["seq_len"],
                         "micro": micro, "global_batch": global_batch, "ckpt": bool(layout.get("grad_ckpt")),
                         "compiled": bool(compiled) if compiled is not None else "compile" in path.name,
                         "offload": bool(layout.get("offload_optimizer")), "measured": r["tokens_per_s"],
                         "gpu": "H200" if "H200" in f"{r.get('gpu', '')}{path.name}".upper() else "H100-80GB"})
    return runs


def predicted(run: dict) -> float:
    step = step_seconds(load_model(run["model"]), get_gpu(run["gpu"]), task=run["task"], seq_len=run["seq"],
                        micro_batch=run["micro"], grad_accum=run["global_batch"] // run["micro"], data_parallel=1,
                        gpus_per_node=1, grad_ckpt=run["ckpt"], compiled=run["compiled"], zero_stage=0,
                        offload_optimizer=run["offload"], offload_params=False)
    return tokens_per_second(step, run["global_batch"], run["seq"])


def test_predicted_tokens_per_s_stay_within_the_calibration_on_every_committed_run():
    runs = measured_runs()
    errors = {f"{r['file']}:{r['model']}:{r['task']}:mb{r['micro']}": math.log(predicted(r) / r["measured"]) for r in runs}
    assert len(runs) >= 40
    assert sum(abs(e) for e in errors.values()) / len(errors) < 0.2  # mean error about 15%
    assert all(abs(e) < math.log(1.7) for e in errors.values()), errors


def test_8b_full_on_h100s_trains_without_offload_on_more_gpus_for_fewer_gpu_hours():
    spec = load_model("llama-3.1-8b")
    hours = plan(spec, "full", "H100-80GB")
    fewest = plan(spec, "full", "H100-80GB", objective="gpus")
    assert fewest.gpus == 1 and fewest.offload_optimizer
    assert hours.gpus > 1 and not hours.offload_optimizer
    assert hours.gpu_hours_per_million_tokens < fewest.gpu_hours_per_million_tokens / 2
    assert hours.predicted_tokens_per_s > 5 * fewest.predicted_tokens_per_s


def test_a_model_that_fits_one_gpu_without_offload_keeps_one_gpu():
    p = plan(load_model("llama-3.2-1b"), "full", "H100-80GB")
    assert p.gpus == 1 and not p.offload_optimizer and p.predicted_tokens_per_s > 0


def test_the_gpu_limit_still_holds_under_the_gpu_hours_objective():
    p = plan(load_model("llama-3.1-8b"), "full", "H100-80GB", max_gpus=1)
    assert p.gpus == 1 and p.offload_optimizer


def test_the_objective_is_for_training_and_serving_plans_only():
    with pytest.raises(PlanError, match="objective .* applies to task lora / qlora / full / serve"):
        plan(load_model("llama-3.2-1b"), "generate", "L4", objective="gpus")
