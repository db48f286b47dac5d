"""The several-GPU training bench (bench/multigpu): its cases are jobs gpufleet places, and its scaling sums."""

import pytest

from bench.multigpu.layouts import CASES, predictions, scaling


@pytest.mark.parametrize("gpu, refused", [("H100-80GB", {"8b-full-z3-2gpu"}), ("H200", set())])
def test_every_multi_gpu_case_is_placed_as_written_or_refused_in_one_line(gpu, refused):
    got = predictions(gpu)
    assert {n for n, p in got.items() if "refused" in p} == refused
    for name in refused:  # ZeRO-3 without offload: 82 GiB per GPU at two, more than an H100 holds
        assert "\n" not in got[name]["refused"] and "To fix: drop those pins" in got[name]["refused"]
    for name, p in got.items():
        if name not in refused:
            assert all(p["layout"][k] == v for k, v in CASES[name][2].items())


def test_scaling_efficiency_is_tokens_per_gpu_against_the_fewest_gpus_a_series_ran_on():
    rows = [{"case": "s-1gpu", "status": "ok", "tokens_per_s": 1000}, {"case": "s-2gpu", "status": "ok",
             "tokens_per_s": 1800}, {"case": "s-4gpu", "status": "ok", "tokens_per_s": 3400},
            {"case": "t-2gpu", "status": "ok", "tokens_per_s": 10}, {"case": "u-2gpu", "status": "OOM"},
            {"case": "u-4gpu", "status": "ok", "tokens_per_s": 50}]
    assert scaling(rows) == [
        {"series": "s", "gpus": 1, "tokens_per_s_per_gpu": 1000, "efficiency": 1.0, "against_gpus": 1},
        {"series": "s", "gpus": 2, "tokens_per_s_per_gpu": 900, "efficiency": 0.9, "against_gpus": 1},
        {"series": "s", "gpus": 4, "tokens_per_s_per_gpu": 850, "efficiency": 0.85, "against_gpus": 1},
    ]  # a series that ran at one GPU count says nothing about scaling


def test_the_two_gpu_zero_runs_stay_within_the_targets():
    # recomputed from today's model: ZeRO-2 and ZeRO-3 across two H200s (bench/multigpu/results)
    import json
    from pathlib import Path

    from bench.train.gpu_layouts import compare

    runs = json.loads((Path(__file__).parents[1] / "bench/multigpu/results/h200x2-zero.json").read_text())
    rows = compare(runs)
    assert len(rows) == 2 and all(abs(r["peak_error"]) <= 0.10 for r in rows), rows
