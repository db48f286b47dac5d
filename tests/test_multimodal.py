"""Vision-language checkpoints (Llama-3.2-Vision, Qwen2-VL, LLaVA): counted as transformers builds them,
planned for serving with TP legality from the text model's heads, where vLLM still serves them."""

import json

import pytest
from accelerate import init_empty_weights
from transformers import AutoConfig, AutoModelForImageTextToText

from gpufleet.catalogue.errors import PlanError
from gpufleet.catalogue.model import MODELS_DIR, load_model
from gpufleet.catalogue.planner import plan

MULTIMODAL = ["llama-3.2-11b-vision", "qwen2-vl-7b", "llava-1.5-7b"]


@pytest.mark.parametrize("name", MULTIMODAL)
def test_parameter_count_equals_what_transformers_builds(name):
    cfg = AutoConfig.for_model(**json.loads((MODELS_DIR / f"{name}.json").read_text()))
    with init_empty_weights():
        model = AutoModelForImageTextToText.from_config(cfg)
    model.tie_weights()
    assert load_model(name).num_params == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", ["llama-3.2-11b-vision", "llama-3.2-90b-vision"])
def test_mllama_is_refused_for_serving_in_one_line_naming_vllm_and_an_alternative(name):
    with pytest.raises(PlanError, match=r"vLLM removed Mllama .* after 0\.10\.2.*To fix: serve .* qwen2-vl-7b") as e:
        plan(load_model(name), "serve", "A100-80GB")
    assert "\n" not in str(e.value)


def test_a_vision_model_vllm_serves_on_t4s_needs_tp2_and_says_why_not_fewer():
    p = plan(load_model("qwen2-vl-7b"), "serve", "T4")
    assert (p.tensor_parallel, p.gpus, p.nodes) == (2, 2, 1)
    assert "TP=1:" in p.notes[0]


def test_tp_legality_comes_from_the_text_models_heads():
    with pytest.raises(PlanError, match="28"):  # Qwen2-VL-7B: 28 query heads, 4 KV heads
        plan(load_model("qwen2-vl-7b"), "serve", "T4", gpus=8)


def test_generate_plans_refuse_vision_checkpoints_in_one_line():
    with pytest.raises(PlanError, match="--task serve") as e:
        plan(load_model("llava-1.5-7b"), "generate", "A10G")
    assert "\n" not in str(e.value)
