"""Quantized weights: checkpoints' quantization_config and bitsandbytes loading, sized by bits,
groups and scales, checked against what an H100 measured."""

import json
import statistics
from pathlib import Path

import pytest

from gpufleet.catalogue.errors import PlanError, SpecError
from gpufleet.catalogue.memory import generate_memory
from gpufleet.catalogue.model import MODELS_DIR, load_model, spec_from_config
from gpufleet.catalogue.planner import plan
from gpufleet.catalogue.quantization import bitsandbytes

MEASURED = Path(__file__).parents[1] / "bench" / "memory" / "results" / "h100-quantized.json"
AWQ = {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemm"}
GPTQ = {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False, "sym": True}


def quantized(name: str, qc: dict):
    cfg = json.loads((MODELS_DIR / f"{name}.json").read_text())
    return spec_from_config({**cfg, "quantization_config": qc}, name=f"{name}-{qc['quant_method']}")


@pytest.fixture(scope="module")
def measured():
    return json.loads(MEASURED.read_text())["generate"]


def test_bitsandbytes_weights_match_the_h100_within_1_5_percent(measured):
    for r in measured:
        predicted = load_model(r["model"]).weight_bytes(2, bitsandbytes(r["quant"]))
        assert abs(predicted / r["weights"] - 1) < 0.015, r


def test_quantized_generate_peaks_match_the_h100_within_5_percent(measured):
    errors = []
    for r in measured:
        m = generate_memory(load_model(r["model"]), r["batch"], r["prompt"], r["new_tokens"],
                            quant=bitsandbytes(r["quant"]))
        errors.append(abs(m.peak / r["generate_peak"] - 1))
    assert max(errors) < 0.05 and statistics.median(errors) < 0.02


def test_awq_4bit_checkpoint_weighs_about_a_third_of_bf16():
    spec, base = quantized("llama-3.1-8b", AWQ), load_model("llama-3.1-8b")
    # decoder linears at 4 bits + an fp16 scale and a 4-bit zero per 128 weights; embeddings and head stay 16-bit
    assert 0.34 < spec.weight_bytes(2) / base.weight_bytes(2) < 0.38
    assert spec.linear_bytes_per_weight(spec.quantization) == pytest.approx(0.5 + 2.5 / 128)


def test_gptq_per_channel_group_keeps_one_scale_per_row():
    spec = quantized("llama-3.2-1b", {**GPTQ, "group_size": -1})
    assert spec.quantization.group_size is None
    assert 0.5 < spec.linear_bytes_per_weight(spec.quantization) < 0.502


def test_compressed_tensors_w4a16_reads_its_config_group():
    qc = {"quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": {"group_0": {
        "targets": ["Linear"], "weights": {"num_bits": 4, "type": "int", "strategy": "group", "group_size": 128,
                                           "symmetric": True}}}, "ignore": ["lm_head"]}
    q = quantized("qwen2.5-7b", qc).quantization
    assert (q.bits, q.group_size, q.zero_point) == (4, 128, False)


def test_unknown_quant_method_is_one_line():
    with pytest.raises(SpecError, match="quant_method='hqq'.*awq, gptq") as e:
        quantized("llama-3.2-1b", {"quant_method": "hqq"})
    assert "\n" not in str(e.value)


def test_bad_bits_value_names_the_field():
    with pytest.raises(SpecError, match="quantization_config has an invalid bits"):
        quantized("llama-3.2-1b", {**AWQ, "bits": "four"})


def test_serve_plan_names_the_checkpoints_method_for_vllm():
    spec = quantized("llama-3.1-70b", AWQ)
    hopper = plan(spec, "serve", "H100")
    assert hopper.engine_kwargs["quantization"] == "awq_marlin" and hopper.gpus == 1
    assert plan(spec, "serve", "T4", gpus=4).engine_kwargs["quantization"] == "awq"  # no Marlin before sm80


def test_quantized_checkpoint_fits_where_bf16_does_not():
    assert plan(load_model("llama-3.1-70b"), "serve", "H100", objective="gpus").gpus == 2
    assert plan(quantized("llama-3.1-70b", GPTQ), "serve", "H100", objective="gpus").gpus == 1


def test_generate_quant_nf4_shrinks_the_plan():
    full = plan(load_model("llama-3.1-70b"), "generate", "A100-80GB")
    nf4 = plan(load_model("llama-3.1-70b"), "generate", "A100-80GB", quantization="nf4")
    assert full.gpus == 2 and nf4.gpus == 1 and nf4.quantization == "nf4"


def test_quantizing_a_quantized_checkpoint_again_is_refused():
    with pytest.raises(SpecError, match="already quantized.*drop --quant"):
        plan(quantized("llama-3.2-1b", AWQ), "generate", "T4", quantization="int8")
    with pytest.raises(PlanError, match="already quantized"):
        plan(quantized("llama-3.2-1b", AWQ), "serve", "H100", quantization="fp8")


def test_load_time_quantization_outside_its_task_is_one_line():
    with pytest.raises(PlanError, match="quantization=nf4 applies to task 'generate', not to 'lora'"):
        plan(load_model("llama-3.2-1b"), "lora", "T4", quantization="nf4")
    with pytest.raises(PlanError, match="quantization=fp8 applies to task 'serve', not to 'generate'"):
        plan(load_model("llama-3.2-1b"), "generate", "H100", quantization="fp8")


def test_a_model_too_big_for_one_node_in_16_bits_is_pointed_at_nf4():
    with pytest.raises(PlanError, match=r"one node\) in 16 bits.*--quantization nf4\): .* on 4 x H100"):
        plan(load_model("llama-3.1-405b"), "generate", "H100")


def test_qlora_step_peaks_match_the_h100_within_2_percent():
    # regression guard: QLORA_LOGITS and the fp32 residual term were read off these 8 rows
    from gpufleet.catalogue.memory import TrainSetup, estimate

    for r in json.loads(MEASURED.read_text())["qlora"]:
        m = estimate(load_model(r["model"]), TrainSetup(task="qlora", micro_batch=r["batch"], seq_len=r["seq"],
                                                        grad_ckpt=True))
        assert abs(m.peak / r["step_peak"] - 1) < 0.02, r


def test_qlora_fits_70b_on_one_a100_where_lora_must_offload_its_weights():
    spec = load_model("llama-3.1-70b")
    q = plan(spec, "qlora", "A100-80GB")
    assert q.gpus == 1 and q.grad_ckpt and q.memory.weights < 45 * 2**30 and q.host_bytes_per_gpu == 0
    lora = plan(spec, "lora", "A100-80GB", objective="gpus")
    assert lora.gpus == 1 and lora.offload_params and lora.host_bytes_per_gpu > 100 * 2**30


def test_qlora_on_a_gpu_without_bitsandbytes_kernels_is_refused():
    with pytest.raises(PlanError, match="M60 has 5.2"):
        plan(load_model("llama-3.2-1b"), "qlora", "M60")


def test_qlora_micro_batches_stay_within_the_measured_tokens():
    p = plan(load_model("llama-3.1-8b"), "qlora", "H100", seq_len=2048, global_batch=16)
    assert p.micro_batch * p.seq_len <= 4096 and p.micro_batch * p.grad_accum == 16


def test_awq_tp_needs_whole_quantization_groups_in_every_ranks_shard():
    """Qwen2.5-72B's MLP width 29568 is 231 groups of 128: no TP>1 splits it, and vLLM refuses such a load.
    Qwen's own AWQ release pads it to 29696 (232 groups), which TP 2, 4 and 8 split."""
    unpadded = quantized("qwen2.5-72b", AWQ)
    with pytest.raises(PlanError, match=r"tensor_parallel_size=2 does not split .*width 29568 into whole awq groups "
                                        r"of 128 per rank \(231 groups\)\. To fix: use one of \[1\]"):
        plan(unpadded, "serve", "H100", gpus=2)
    cfg = json.loads((MODELS_DIR / "qwen2.5-72b.json").read_text())
    padded = spec_from_config({**cfg, "intermediate_size": 29696, "quantization_config": AWQ}, name="qwen2.5-72b-awq")
    assert [plan(padded, "serve", "H100", gpus=n).tensor_parallel for n in (2, 4, 8)] == [2, 4, 8]


def test_gptq_per_channel_checkpoints_are_not_held_to_a_group_width():
    per_channel = quantized("qwen2.5-72b", {**GPTQ, "group_size": -1})
    assert plan(per_channel, "serve", "H100", gpus=4).tensor_parallel == 4
