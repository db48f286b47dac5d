"""Memory model: structure of the breakdown, and accuracy against measured H100 peaks."""

import json
from pathlib import Path

import pytest

from bench.memory.compare import compare
from gpufleet.catalogue.memory import (
    GIB,
    HOST_BASE,
    TrainSetup,
    estimate,
    fits,
    host_peak,
    layer_activation_bytes,
)
from gpufleet.catalogue.model import builtin_models, load_model

RESULTS = Path(__file__).parents[1] / "bench" / "memory" / "results"
TRAIN_RESULTS = RESULTS.parents[1] / "train" / "results"


def test_full_bf16_optimizer_step_holds_five_copies_of_the_weights():
    # weights + grads + exp_avg + exp_avg_sq + foreach AdamW's sqrt temporary
    spec = load_model("llama-3.1-8b")
    m = estimate(spec, TrainSetup(task="full", micro_batch=1, seq_len=128, grad_ckpt=True))
    assert m.peak_phase == "optimizer step" and m.peak == 5 * 2 * spec.num_params


def test_lora_keeps_adapters_in_fp32_and_base_in_bf16():
    spec = load_model("llama-3.2-1b")
    m = estimate(spec, TrainSetup(task="lora", seq_len=256))
    assert m.weights == 2 * spec.num_params and m.lora_adapters == m.gradients


def test_checkpointing_lowers_activations():
    spec = load_model("qwen2.5-3b")
    plain = estimate(spec, TrainSetup(task="full", micro_batch=4, seq_len=2048))
    ckpt = estimate(spec, TrainSetup(task="full", micro_batch=4, seq_len=2048, grad_ckpt=True))
    assert ckpt.activations < plain.activations / 10


def test_infer_peak_grows_linearly_with_tokens():
    spec = load_model("qwen2.5-0.5b")
    a, b = (estimate(spec, TrainSetup(task="infer", micro_batch=n, seq_len=512)) for n in (1, 2))
    c = estimate(spec, TrainSetup(task="infer", micro_batch=3, seq_len=512))
    assert c.peak - b.peak == b.peak - a.peak > 0


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_higher_zero_stage_never_needs_more_memory(stage):
    spec = load_model("llama-3.1-8b")
    lo, hi = (estimate(spec, TrainSetup(task="full", engine="deepspeed", data_parallel=4, zero_stage=z,
                                        grad_ckpt=True, seq_len=2048)) for z in (stage - 1, stage))
    assert hi.peak <= lo.peak


def test_optimizer_offload_moves_states_to_host():
    spec = load_model("llama-3.1-8b")
    m = estimate(spec, TrainSetup(task="full", engine="deepspeed", zero_stage=2, offload_optimizer=True,
                                  grad_ckpt=True))
    assert m.optimizer_states == 0 and m.cpu_offload >= 12 * spec.num_params


def test_param_offload_needs_zero3():
    with pytest.raises(ValueError, match="offload_params needs zero_stage=3"):
        TrainSetup(task="full", engine="deepspeed", zero_stage=2, offload_params=True)


def test_zero_or_negative_sizes_are_rejected():
    with pytest.raises(ValueError, match="micro_batch"):
        TrainSetup(task="full", micro_batch=0)
    with pytest.raises(ValueError, match="seq_len"):
        TrainSetup(task="full", seq_len=-5)


def test_fit_keeps_headroom_and_cuda_context():
    assert fits(70 * GIB, 80 * GIB) and not fits(73 * GIB, 80 * GIB)


@pytest.mark.parametrize("measured", ["h100-measured", "h100-heldout-models", "h100-heldout-shapes"])
def test_matches_measured_h100_peaks(measured):
    """The issue's targets on committed H100 measurements (bench/memory/measure.py): the
    calibration set, four models never used for fitting, and unseen batch x sequence shapes."""
    s = compare(json.loads((RESULTS / f"{measured}.json").read_text()))["summary"]
    assert len(s["models"]) >= 4 and s["measured_ok"] >= 20
    assert s["median_abs_error"] <= 0.05
    assert s["worst_abs_error"] <= 0.15
    assert s["oom_predicted_to_fit"] == []


def test_deepspeed_plan_matches_measured_h100_peaks():
    """bench/train/gpu_train.py on an H100: ZeRO 0/1/2, full and LoRA, with and without checkpointing.
    The plan may over-estimate a little (safe) but must never under-estimate materially."""
    from bench.train.compare import rows

    measured = rows()
    assert len(measured) >= 20
    assert all(-0.02 <= r["error"] <= 0.12 for r in measured), [(r["model"], r["task"], r["error"]) for r in measured]


def test_plans_own_layouts_meet_the_training_targets_on_h100():
    """The layout the planner picks (ZeRO, micro-batch x accumulation, torch.compile) for four
    models at seq 2048, global batch 32, run on an H100: peak within 10% of the plan and, for
    full fine-tuning, MFU >= 40%."""
    from bench.train.compare import rows

    planned = [r for r in rows() if r["file"].startswith("h100-plan-")]
    assert len({r["model"] for r in planned}) >= 4
    assert all(-0.02 <= r["error"] <= 0.10 for r in planned), [(r["model"], r["error"]) for r in planned]
    full = [r for r in planned if r["task"] == "full" and r["seq"] == 2048]
    assert full and all(r["mfu"] >= 0.40 for r in full), [(r["model"], r["mfu"]) for r in full]


def test_compiled_training_keeps_fewer_activations():
    spec = load_model("llama-3.2-1b")
    eager, compiled = (estimate(spec, TrainSetup(task="full", engine="deepspeed", micro_batch=4, seq_len=2048,
                                                 compile=c)) for c in (False, True))
    assert compiled.activations < 0.8 * eager.activations
    assert compiled.logits_and_loss < eager.logits_and_loss


def test_gradient_accumulation_keeps_gradients_across_micro_batches():
    spec = load_model("llama-3.2-1b")
    one, many = (estimate(spec, TrainSetup(task="full", engine="deepspeed", micro_batch=4, seq_len=2048,
                                           compile=True, grad_accum=a)) for a in (1, 8))
    assert many.peak_phase == "backward start" and many.peak - one.peak == many.gradients


def test_compile_and_accumulation_need_the_deepspeed_engine():
    with pytest.raises(ValueError, match="engine='deepspeed'"):
        TrainSetup(task="full", compile=True)


def test_offload_with_accumulation_pins_one_half_precision_buffer_per_parameter_on_the_host():
    spec = load_model("llama-3.2-3b")  # 254 tensors: 5.98 GiB asked, 8.44 GiB pinned (logged on an H200)
    common = dict(task="full", engine="deepspeed", zero_stage=2, offload_optimizer=True, grad_ckpt=True)
    one = estimate(spec, TrainSetup(**common, micro_batch=16, grad_accum=1))
    many = estimate(spec, TrainSetup(**common, micro_batch=2, grad_accum=8))
    assert len(spec.parameter_tensors()) == 254
    assert round((many.cpu_offload - one.cpu_offload) / GIB, 3) == 8.438


def test_parameter_tensors_add_up_to_the_parameter_count_of_every_builtin_model():
    for name in builtin_models():
        spec = load_model(name)
        assert sum(spec.parameter_tensors()) == spec.num_params, name


def test_offload_with_accumulation_keeps_no_gradients_on_the_gpu_between_micro_batches():
    spec = load_model("qwen2.5-1.5b")
    common = dict(task="full", engine="deepspeed", zero_stage=2, offload_optimizer=True, grad_ckpt=True,
                  micro_batch=4, compile=True)
    one, many = (estimate(spec, TrainSetup(**common, grad_accum=a)) for a in (1, 4))
    assert many.peak == one.peak and many.peak_phase == "backward start"


def test_offload_boundary_holds_the_gradients_the_staging_buffer_and_an_fp64_copy_of_the_largest():
    spec = load_model("llama-3.2-3b")  # tied 394M-entry embedding: its fp64 copy is 2.9 GiB
    mem = estimate(spec, TrainSetup(task="full", engine="deepspeed", zero_stage=2, offload_optimizer=True,
                                    grad_ckpt=True, micro_batch=2, grad_accum=8, compile=True))
    one_layer = 2 * 2048 * layer_activation_bytes(spec, "full", False)  # the layer backward recomputes
    assert mem.peak_phase == "backward end"
    assert mem.peak == int(mem.weights + mem.gradients + mem.temporaries + one_layer + 2 * spec.embedding_params
                           + 8 * spec.embedding_params)


def test_checkpointed_compiled_softcapped_head_keeps_logits_and_their_tanh():
    spec = load_model("gemma-2-2b")
    common = dict(task="full", engine="deepspeed", zero_stage=2, micro_batch=8, compile=True)
    ckpt, plain = (estimate(spec, TrainSetup(**common, grad_ckpt=c)) for c in (True, False))
    per_entry = 8 * 2048 * spec.vocab_size
    assert ckpt.logits_and_loss == per_entry * 8  # bf16 logits 2 + tanh 2 + fp32 loss gradient 4
    assert plain.logits_and_loss - 4 * spec.mlp_activation_width * 8 * 2048 == per_entry * 7


def test_zero2_offload_pins_each_fp32_partition_in_a_power_of_two_block():
    spec = load_model("llama-3.2-3b")  # 3.2B parameters: 12 GiB fp32 partitions pin 16 GiB each
    mem = estimate(spec, TrainSetup(task="full", engine="deepspeed", zero_stage=2, offload_optimizer=True,
                                    grad_ckpt=True, micro_batch=16))
    # master, grads, bf16 copy, the 0.73 GiB staging twin; Adam's states unpinned
    assert mem.cpu_offload == (16 + 16 + 8 + 1) * GIB + 8 * spec.num_params


def test_zero2_offload_host_peak_is_the_larger_of_the_loaded_model_and_the_offloaded_state():
    spec = load_model("llama-3.2-3b")
    setup = TrainSetup(task="full", engine="deepspeed", zero_stage=2, offload_optimizer=True, micro_batch=16)
    mem = estimate(spec, setup)
    assert host_peak(spec, setup, mem) == mem.cpu_offload + HOST_BASE  # the loaded copy is gone by then


def test_host_peak_adds_the_loaded_model_and_the_process_to_what_zero_offloads():
    spec = load_model("llama-3.1-8b")
    setup = TrainSetup(task="lora", engine="deepspeed", micro_batch=4, grad_accum=4)
    assert host_peak(spec, setup, estimate(spec, setup)) == 2 * spec.num_params + HOST_BASE


def test_the_h100_runs_the_offload_terms_were_read_from_stay_within_the_targets():
    # calibration guard, recomputed from today's model: the held-out rows (docs/accuracy.md) are not asserted
    from bench.train.gpu_layouts import compare

    rows = compare(json.loads((TRAIN_RESULTS / "h100-train-mode-layouts.json").read_text()))
    # the two rows held out at run time missed; the H200 phase runs explained them and the terms changed
    assert len(rows) == 5 and all(abs(r["peak_error"]) <= 0.10 and abs(r["host_error"]) <= 0.15 for r in rows), rows


@pytest.mark.parametrize("results", ["h200-offload-phases.json", "h200-offload-heldout.json"])
def test_the_h200_offload_runs_stay_within_the_targets(results):
    # recomputed from today's model (the held-out file also keeps the prediction made before its run)
    from bench.train.gpu_layouts import predict

    rows = json.loads((TRAIN_RESULTS / results).read_text())["rows"]
    for r in rows:
        pred = predict(r["model"], r["task"], r["seq"], {**r, "offload_params": False})  # one GPU, bf16
        peak, host = pred["predicted_peak_gib"], pred["predicted_host_gib"]
        assert abs(peak / r["measured_peak_gib"] - 1) <= 0.10, (r["model"], peak, r["measured_peak_gib"])
        assert abs(host / r["host_gib"]["end"]["hwm"] - 1) <= 0.15, (r["model"], host)


def test_zero2_offload_frees_the_previous_steps_gradients_before_the_next_forward():
    spec = load_model("llama-3.1-8b")
    common = dict(task="full", engine="deepspeed", zero_stage=2, grad_ckpt=True, micro_batch=16, compile=True)
    offload, on_gpu = (estimate(spec, TrainSetup(**common, offload_optimizer=o)) for o in (True, False))
    staging = 2 * spec.embedding_params
    assert offload.peak_phase == "backward start"
    assert offload.peak == offload.weights + staging + offload.activations + offload.logits_and_loss
    assert on_gpu.peak > on_gpu.weights + on_gpu.gradients + on_gpu.activations  # ZeRO-2 on the GPU keeps them
