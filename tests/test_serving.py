"""vLLM KV-cache arithmetic against hand computation."""

from catalogue.gpus import get_gpu
from catalogue.model import load_model
from catalogue.serving import BLOCK_SIZE, kv_bytes_for_sequence, kv_bytes_per_token_layer, serving_memory


def test_llama_8b_kv_bytes_per_token_is_128_kib():
    spec = load_model("llama-3.1-8b")  # 32 layers x 8 KV heads x 128 x 2 (K,V) x 2 bytes
    assert spec.num_layers * kv_bytes_per_token_layer(spec, tp=1, dtype_bytes=2) == 32 * 8 * 128 * 2 * 2


def test_tp_splits_kv_heads_until_they_must_be_replicated():
    spec = load_model("qwen2.5-7b")  # 4 KV heads
    assert kv_bytes_per_token_layer(spec, 4, 2) == kv_bytes_per_token_layer(spec, 1, 2) // 4
    assert kv_bytes_per_token_layer(spec, 8, 2) == kv_bytes_per_token_layer(spec, 4, 2)  # replicated


def test_sliding_window_layers_keep_only_the_window():
    spec = load_model("gemma-2-2b")  # 13 sliding (4096) + 13 global layers
    per = kv_bytes_per_token_layer(spec, 1, 2)
    assert kv_bytes_for_sequence(spec, 8192, 1, 1, 2) == per * (13 * 4096 + 13 * 8192)


def test_sequence_rounds_up_to_whole_blocks():
    spec = load_model("llama-3.1-8b")
    per_token = spec.num_layers * kv_bytes_per_token_layer(spec, 1, 2)
    assert kv_bytes_for_sequence(spec, 1, 1, 1, 2) == BLOCK_SIZE * per_token


def test_kv_budget_is_utilization_minus_weights_activations_and_overhead():
    m = serving_memory(load_model("llama-3.1-8b"), get_gpu("H100-80GB"), context=8192)
    assert m.kv_cache == int(0.9 * get_gpu("H100-80GB").memory_bytes) - m.weights - m.activation_peak - m.non_torch
    assert m.concurrent_seqs == m.kv_cache // kv_bytes_for_sequence(load_model("llama-3.1-8b"), 8192, 1, 1, 2)


def test_max_model_len_is_the_longest_sequence_that_fits():
    spec, gpu = load_model("llama-3.1-70b"), get_gpu("H100-80GB")
    m = serving_memory(spec, gpu, tp=2)
    assert kv_bytes_for_sequence(spec, m.max_model_len, 2, 1, 2) <= m.kv_cache
    assert kv_bytes_for_sequence(spec, m.max_model_len + BLOCK_SIZE, 2, 1, 2) > m.kv_cache


def test_more_tensor_parallel_ranks_leave_more_kv_per_gpu():
    spec, gpu = load_model("llama-3.1-70b"), get_gpu("H100-80GB")
    kv = [serving_memory(spec, gpu, tp=tp).kv_tokens for tp in (2, 4, 8)]
    assert kv == sorted(kv) and kv[0] < kv[-1]
