"""Model FLOPs for MFU follow PaLM's convention."""

from gpufleet.catalogue.flops import matmul_params, mfu, train_flops_per_token
from gpufleet.catalogue.model import load_model


def test_full_fine_tune_counts_six_flops_per_weight_plus_attention():
    spec = load_model("llama-3.2-1b")  # tied embeddings: the table is the LM head
    expected = 6 * spec.num_params + 12 * spec.num_layers * spec.q_dim * 2048
    assert train_flops_per_token(spec, 2048, "full") == expected


def test_untied_input_embedding_is_a_lookup_not_a_matmul():
    spec = load_model("llama-3.1-8b")
    assert not spec.tie_word_embeddings
    assert matmul_params(spec) == spec.num_params - spec.vocab_size * spec.hidden_size


def test_lora_skips_the_weight_gradients():
    spec = load_model("qwen2.5-1.5b")
    attention = 12 * spec.num_layers * spec.q_dim * 1024
    assert train_flops_per_token(spec, 1024, "lora") - attention == 4 / 6 * (
        train_flops_per_token(spec, 1024, "full") - attention)


def test_moe_counts_only_routed_experts():
    spec = load_model("mixtral-8x7b")
    assert train_flops_per_token(spec, 1, "full") < 6 * spec.num_params / 3


def test_mfu_is_achieved_over_peak():
    assert mfu(tokens_per_s=1000.0, flops_per_token=1e9, peak_tflops=2.0) == 0.5
