"""The several-GPU training bench (bench/multigpu): its cases are jobs gpufleet places, and its scaling sums."""

import shutil

import pytest

from bench.multigpu.layouts import CASES, scaling
from bench.train.gpu_layouts import job_spec, synthetic_chat
from catalogue.model import MODELS_DIR
from jobs.finetune import prepare


def _prepared(tmp_path, tiny_model, gpu: str) -> dict[str, object]:
    """Each case's layout as `gpufleet train` resolves it for ``gpu`` (no cluster), or its refusal."""
    data = tmp_path / "chat.jsonl"
    synthetic_chat(data, 20)
    got: dict[str, object] = {}
    for name, (model, task, overrides, batch, seq) in CASES.items():
        model_dir = tmp_path / model  # the built-in config beside a real tokenizer: planning reads no weights
        if not model_dir.exists():
            shutil.copytree(tiny_model, model_dir, ignore=shutil.ignore_patterns("*.safetensors"))
            shutil.copy(MODELS_DIR / f"{model}.json", model_dir / "config.json")
        spec = job_spec(tmp_path / f"{name}.yaml", name, model_dir, data, task, overrides, batch, seq, 8,
                        tmp_path / "out" / name, every=10, gpu=gpu)
        try:
            got[name] = prepare(spec)[1]
        except Exception as e:  # noqa: BLE001 - the refusal is what is checked
            got[name] = e
    return got


@pytest.mark.parametrize("gpu, refused", [("H100-80GB", {"8b-full-z3-2gpu"}), ("H200", set())])
def test_every_multi_gpu_case_is_placed_as_written_or_refused_in_one_line(tmp_path, tiny_model, gpu, refused):
    got = _prepared(tmp_path, tiny_model, gpu)
    assert {n for n, v in got.items() if isinstance(v, Exception)} == refused
    for name in refused:  # ZeRO-3 without offload: 82 GiB per GPU at two, more than an H100 holds
        assert "\n" not in str(got[name]) and "To fix" in str(got[name])
    for name, layout in got.items():
        if name in refused:
            continue
        overrides = CASES[name][2]
        assert len(layout.placement.bundles) == overrides["workers"]
        assert all(getattr(layout, k) == v for k, v in overrides.items() if k != "workers")


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
