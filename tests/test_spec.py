"""ModelSpec: exact parameter counts per family, config parsing, clear errors."""

import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from gpufleet.catalogue.errors import SpecError
from gpufleet.catalogue.model import FAMILIES, builtin_models, load_model, spec_from_config

ONE_PER_FAMILY = ["llama-3.2-1b", "mistral-7b-v0.3", "mixtral-8x7b", "qwen2.5-0.5b", "qwen1.5-moe-a2.7b",
                  "qwen3-8b", "qwen3-30b-a3b", "gemma-2-2b", "gemma-3-1b", "phi-3-mini-4k"]


def transformers_param_count(cfg: dict) -> int:
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**cfg))
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", ONE_PER_FAMILY)
def test_param_count_equals_transformers(name):
    cfg = json.loads(builtin_models()[name].read_text())
    assert load_model(name).num_params == transformers_param_count(cfg)


def test_param_count_equals_transformers_for_untied_small_llama():
    cfg = dict(model_type="llama", hidden_size=320, intermediate_size=864, num_hidden_layers=3,
               num_attention_heads=5, num_key_value_heads=1, vocab_size=1000, tie_word_embeddings=False)
    assert spec_from_config(cfg).num_params == transformers_param_count(cfg)


def test_builtin_list_spans_half_to_405_billion_dense_and_moe():
    specs = [load_model(n) for n in builtin_models()]
    sizes = [s.num_params for s in specs]
    assert len(specs) >= 20
    assert min(sizes) < 0.6e9 and max(sizes) > 400e9
    assert any(s.is_moe for s in specs) and any(not s.is_moe for s in specs)


def test_moe_active_params_count_routed_experts_only():
    mixtral = load_model("mixtral-8x7b")
    assert 12.5e9 < mixtral.active_params < 13.2e9 < mixtral.num_params


def test_dtype_read_from_either_key():
    base = dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, vocab_size=100)
    assert spec_from_config({**base, "torch_dtype": "float16"}).torch_dtype == "float16"
    assert spec_from_config({**base, "dtype": "float32"}).torch_dtype == "float32"


def test_head_dim_taken_from_config_when_given():
    spec = load_model("gemma-2-9b")  # 16 heads x 256 != hidden 3584
    assert spec.head_dim == 256 and spec.q_dim == 4096


def test_gemma2_alternates_sliding_and_global_layers():
    spec = load_model("gemma-2-2b")
    assert spec.sliding_layers == tuple(range(0, 26, 2))


def test_qwen_without_use_sliding_window_has_no_sliding_layers():
    assert load_model("qwen2.5-7b").sliding_layers == ()


def test_unknown_model_type_lists_supported_ones():
    with pytest.raises(SpecError, match="unsupported model_type 'gpt2'.*llama"):
        spec_from_config(dict(model_type="gpt2", hidden_size=8))
    assert "llama" in FAMILIES


def test_missing_field_is_named():
    with pytest.raises(SpecError, match="no 'intermediate_size'"):
        spec_from_config(dict(model_type="llama", hidden_size=64, num_hidden_layers=2,
                              num_attention_heads=4, vocab_size=100))


def test_negative_size_is_rejected_with_field_name():
    with pytest.raises(SpecError, match="hidden_size"):
        spec_from_config(dict(model_type="llama", hidden_size=-64, intermediate_size=128,
                              num_hidden_layers=2, num_attention_heads=4, vocab_size=100))


def test_unknown_name_or_path_is_a_clear_error():
    with pytest.raises(SpecError, match="neither a built-in name nor a config.json path"):
        load_model("no-such-model")


def test_model_directory_is_accepted(tmp_path):
    (tmp_path / "config.json").write_text(builtin_models()["qwen2.5-0.5b"].read_text())
    assert load_model(tmp_path).num_params == load_model("qwen2.5-0.5b").num_params
