"""vLLM KV-cache arithmetic against hand computation."""

import json
import os
from pathlib import Path

import pytest

from bench.serve.kv_capacity import with_predictions
from gpufleet.catalogue.gpus import get_gpu
from gpufleet.catalogue.model import load_model
from gpufleet.catalogue.planner import plan
from gpufleet.catalogue.serving import (
    BLOCK_SIZE,
    decode_step_s,
    kv_bytes_for_sequence,
    kv_bytes_per_token_layer,
    kv_groups,
    serving_memory,
    vllm_kv_tokens,
)


def test_llama_8b_kv_bytes_per_token_is_128_kib():
    spec = load_model("llama-3.1-8b")  # 32 layers x 8 KV heads x 128 x 2 (K,V) x 2 bytes
    assert spec.num_layers * kv_bytes_per_token_layer(spec, tp=1, dtype_bytes=2) == 32 * 8 * 128 * 2 * 2


def test_tp_splits_kv_heads_until_they_must_be_replicated():
    spec = load_model("qwen2.5-7b")  # 4 KV heads
    assert kv_bytes_per_token_layer(spec, 4, 2) == kv_bytes_per_token_layer(spec, 1, 2) // 4
    assert kv_bytes_per_token_layer(spec, 8, 2) == kv_bytes_per_token_layer(spec, 4, 2)  # replicated


def test_sliding_window_layers_keep_only_the_window_and_the_block_it_straddles():
    spec = load_model("gemma-2-2b")  # 13 sliding (4096) + 13 global layers
    per = kv_bytes_per_token_layer(spec, 1, 2)
    assert kv_bytes_for_sequence(spec, 8192, 1, 1, 2) == per * 13 * (8192 + 4096 + BLOCK_SIZE)
    assert kv_bytes_for_sequence(spec, 1000, 1, 1, 2) == per * 26 * 1008  # under the window: every layer


def test_hybrid_layers_are_grouped_and_padded_as_vllm_lays_them_out():
    # gemma-3-1b: 22 sliding (512) + 4 global layers -> groups of 4: one global, six sliding (two padding layers)
    assert kv_groups(load_model("gemma-3-1b")) == (4, 1, 6)
    assert kv_groups(load_model("gemma-2-2b")) == (13, 1, 1)
    assert kv_groups(load_model("llama-3.1-8b")) == (32, 1, 0)


def test_reported_kv_tokens_charge_sliding_groups_a_whole_prefill_chunk():
    spec = load_model("gemma-3-1b")
    page_group = 4 * BLOCK_SIZE * kv_bytes_per_token_layer(spec, 1, 2)
    budget = 1000 * page_group  # 1000 block ids
    # per 8192-token request: 512 blocks in the global group, 8192/16 + 1 in each of the six sliding ones
    assert vllm_kv_tokens(spec, budget, 1, 1, 2, 8192, 8192) == int(1000 / (512 + 6 * 513) * 8192)
    # with 2048-token prefill chunks a sliding group holds at most 511 + 2048 tokens
    assert vllm_kv_tokens(spec, budget, 1, 1, 2, 8192, 2048) == int(1000 / (512 + 6 * (160 + 1)) * 8192)


def test_reported_kv_tokens_of_a_full_attention_model_are_whole_blocks_of_the_budget():
    spec = load_model("llama-3.1-8b")
    per_block = BLOCK_SIZE * spec.num_layers * kv_bytes_per_token_layer(spec, 1, 2)
    assert vllm_kv_tokens(spec, 100 * per_block + 5, 1, 1, 2, 8192, 8192) == 100 * BLOCK_SIZE


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


def test_decode_speed_stays_within_its_calibration_band_on_the_five_fitted_models():
    # calibration guard, not a held-out check: the overheads were fitted to these rows (catalogue/serving.py)
    from bench.serve import decode_heldout
    from bench.serve.decode_speed import DEFAULT, rows

    results = DEFAULT.parent
    errors = [r["plain_error"] for f in (DEFAULT, results / "h100-serve-8b-fp8.json")
              for r in rows(json.loads(f.read_text())) if r["concurrency"] <= 32]
    first_held_out = json.loads((results / "h100-decode-heldout.json").read_text())["decode_rows"]
    errors += [decode_heldout.predicted_tpot_ms(r["model"], r["quantization"], r["concurrency"])
               / r["measured_tpot_ms"] - 1 for r in first_held_out]
    assert len(errors) == 15 and all(abs(e) < 0.25 for e in errors)
    assert sum(abs(e) for e in errors) / len(errors) < 0.1


def test_seventy_b_on_h100s_is_planned_at_tp4_for_far_more_tokens_per_gpu_unless_told_the_fewest_gpus():
    p = plan(load_model("llama-3.1-70b"), "serve", "H100")
    fewest = plan(load_model("llama-3.1-70b"), "serve", "H100", objective="gpus")
    assert (p.tensor_parallel, fewest.tensor_parallel) == (4, 2)
    assert p.predicted_output_tokens_per_s / p.gpus > 1.5 * fewest.predicted_output_tokens_per_s / fewest.gpus
    assert any(n.startswith("TP=4: ") and "--objective gpus plans TP=2" in n for n in p.notes)
    note = next(n for n in fewest.notes if n.startswith("TP=4 would serve"))
    assert "x the output tokens per GPU" in note and "requests of 2048 tokens at once" in note


def test_a_target_load_picks_tp_and_replicas_with_the_fewest_gpus():
    p = plan(load_model("llama-3.1-70b"), "serve", "H100", target_output_tokens_per_s=20000)
    assert (p.tensor_parallel, p.replicas) == (4, 3)
    assert p.replicas * p.predicted_output_tokens_per_s >= 20000
    assert p.notes[0].startswith("20000 output tokens/s: 3 replica(s) of TP=4 = 12 GPUs")
    assert not any("fewer GPUs cannot hold it" in n for n in p.notes)  # TP=2 can: only the fewest layout says why


def test_a_small_model_keeps_tp1_when_wider_tp_gains_little_per_gpu():
    p = plan(load_model("llama-3.1-8b"), "serve", "H100")
    assert p.tensor_parallel == 1 and not any("would serve" in n for n in p.notes)


def test_fp8_weights_decode_on_fp8_tensor_cores_where_a_step_is_compute_bound():
    spec, gpu = load_model("llama-3.1-8b"), get_gpu("H100-80GB")
    m = serving_memory(spec, gpu, context=2048, expected_tokens=256)  # short requests: little KV to read
    bf16, fp8 = (decode_step_s(spec, gpu, m, 1024, fp8_matmul=f) for f in (False, True))
    assert fp8 < bf16  # 1024 sequences: compute-bound, twice the tensor rate
    assert decode_step_s(spec, gpu, m, 1, fp8_matmul=True) == decode_step_s(spec, gpu, m, 1)  # memory-bound
    assert decode_step_s(spec, get_gpu("A100-80GB"), m, 1024, fp8_matmul=True) == decode_step_s(
        spec, get_gpu("A100-80GB"), m, 1024)  # no fp8 tensor cores there


def test_sampled_stacks_sum_by_function_as_shares_of_the_samples():
    from bench.serve.gpu_bench import summarize_stacks

    raw = "run (loop.py:10);send (app.py:3) 3\nrun (loop.py:12);recv (app.py:9) 1\nnot a stack line\n"
    got = summarize_stacks(raw)
    assert got["samples"] == 4
    assert got["self"] == {"send (app.py)": 0.75, "recv (app.py)": 0.25}
    assert got["inclusive"]["run (loop.py)"] == 1.0  # both lines of `run` count as one function


def test_a_process_started_with_the_sampler_records_its_threads_while_the_bench_says_so(tmp_path, monkeypatch):
    import os
    import subprocess
    import sys
    import time

    from bench.serve import gpu_bench
    from bench.serve.sampler import sampled_env

    monkeypatch.setitem(gpu_bench.PROFILE, "dir", tmp_path)
    monkeypatch.setattr(gpu_bench, "PROFILED", ("spin()",))  # keep this test's process by its title
    env = {**os.environ, **sampled_env(tmp_path)}
    busy = "def spin():\n    while True:\n        sum(range(1000))\nspin()"
    with subprocess.Popen([sys.executable, "-c", busy], env=env) as proc:
        try:
            time.sleep(1.0)  # the interpreter starts and imports sitecustomize
            label = gpu_bench.start_profile(7)
            time.sleep(0.5)
            got = gpu_bench.finish_profile(label)
        finally:
            proc.kill()
    (key, threads), = got.items()
    assert key.startswith(f"{proc.pid} ") and "-c" in key
    assert threads["MainThread"]["samples"] >= 20
    assert threads["MainThread"]["inclusive"]["spin (<string>)"] == 1.0
    assert not list(tmp_path.glob("c7-*"))  # read, then removed


def test_a_watched_replica_logs_the_time_its_event_loop_was_blocked(tmp_path, monkeypatch):
    import asyncio
    import time

    from bench.serve import stall_log, variants

    monkeypatch.setattr(stall_log, "WATCH_DIR", tmp_path)

    async def blocked_once() -> None:
        with (tmp_path / "1.jsonl").open("a", buffering=1) as log:
            watcher = asyncio.create_task(variants.watch_loop(log))
            await asyncio.sleep(0.02)
            time.sleep(0.03)  # blocks the loop, as a slow synchronous call in a replica would
            await asyncio.sleep(0.02)
            watcher.cancel()

    since = time.time()
    asyncio.run(blocked_once())
    late = stall_log.pause_summary(since, time.time())[f"loop late >= {variants.LATE_MS:g} ms"]
    assert late["count"] >= 1 and late["max_ms"] >= 25  # the 30 ms block; a loaded machine may add lateness


def _bench_run(side: str, tok_s: float, ttft_ms: float, itl_p99_ms: float) -> dict:
    level = {"concurrency": 8, "output_throughput": tok_s, "median_ttft_ms": ttft_ms, "p99_itl_ms": itl_p99_ms}
    return {"side": side, "levels": [level]}


def test_the_gpu_bench_compares_gpufleet_with_plain_mp_as_well_as_plain():
    from bench.serve.gpu_bench import compare_all

    result = compare_all({"sides": [_bench_run("plain", 1000, 40, 5.0), _bench_run("gpufleet", 990, 41, 6.0),
                                    _bench_run("plain-mp", 1000, 40, 5.8)]})
    assert result["rows"][0]["itl_p99_ratio"] == 1.2
    assert result["rows_against_plain_mp"][0]["itl_p99_ratio"] == round(6.0 / 5.8, 3)
    assert result["rows_against_plain_mp"][0]["plain_vllm"][0]["p99_itl_ms"] == 5.8


def test_the_gpu_bench_reports_how_far_repeated_runs_of_a_side_differ():
    from bench.serve.gpu_bench import compare_all

    result = compare_all({"sides": [_bench_run("plain", 1000, 40, 5.0), _bench_run("gpufleet", 990, 41, 6.0),
                                    _bench_run("plain", 1100, 50, 8.0)]})
    assert result["repeat_spread"] == {"plain": [{"concurrency": 8, "runs": 2, "throughput_max_over_min": 1.1,
                                                  "ttft_p50_max_over_min": 1.25, "itl_p99_max_over_min": 1.6}]}
    assert result["rows"][0]["itl_p99_ratio"] == round(6.0 / 6.5, 3)  # against plain's mean


KV_RESULTS = Path(__file__).parents[1] / "bench" / "serve" / "results"


@pytest.mark.parametrize("results", ["h100-kv-capacity.json", "h100-kv-hybrid.json", "h100-kv-capacity-fp8.json"])
def test_kv_tokens_stay_within_3_percent_of_vllm_and_at_most_1_percent_optimistic(results):
    data = json.loads((KV_RESULTS / results).read_text())
    rows = with_predictions(data["rows"], data["gpu"], data["gpu_memory_utilization"], data["max_model_len"],
                            data.get("fp8", "none"))
    errors = {r["model"]: r["error"] for r in rows}
    assert all(-0.03 <= e <= 0.01 for e in errors.values()), errors


def test_a_replicas_start_is_split_into_process_model_files_engine_and_http_app():
    from gpufleet.serve_apps.startup import StartupClock

    clock = StartupClock(process_started=100.0, init_entered=106.0,
                         marks={"node_init_started": 106.5, "node_init_done": 107.0, "engine_started": 130.0,
                                "http_app_built": 130.5})
    assert clock.phases() == {"process": 6.0, "model_files": 0.5, "engine": 23.0, "http_app": 0.5}
    assert clock.total() == 30.5
    assert clock.summary(True).startswith("replica ready in 30.5 s: process 6.0 s, model files 0.5 s, engine 23.0 s")


def test_the_engine_config_step_is_a_phase_of_its_own_when_marked():
    from gpufleet.serve_apps.startup import StartupClock

    clock = StartupClock(process_started=100.0, init_entered=106.0,
                         marks={"node_init_started": 106.5, "node_init_done": 107.0, "engine_config_built": 118.0,
                                "engine_started": 130.0})
    assert clock.phases() == {"process": 6.0, "model_files": 0.5, "engine_config": 11.0, "engine": 12.0}


def test_a_replica_searches_its_torch_store_port_from_a_free_port_of_its_own(monkeypatch):
    """vLLM 0.26's Ray executor searches upward from VLLM_DP_MASTER_PORT + 100 (port 100 for every replica
    otherwise, where two replicas starting together on one node collide)."""
    import socket

    from gpufleet.serve_apps.startup import DP_MASTER_PORT_ENV, spread_tcpstore_port

    monkeypatch.delenv(DP_MASTER_PORT_ENV, raising=False)
    task_env: dict[str, str] = {}
    spread_tcpstore_port(task_env)
    assert task_env[DP_MASTER_PORT_ENV] == os.environ[DP_MASTER_PORT_ENV]  # GPU: the config task's env
    start = int(task_env[DP_MASTER_PORT_ENV]) + 100
    assert start >= 1024
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", start))  # free: the search's first try succeeds


def test_a_data_parallel_master_port_set_by_the_user_is_kept(monkeypatch):
    from gpufleet.serve_apps.startup import DP_MASTER_PORT_ENV, spread_tcpstore_port

    monkeypatch.setenv(DP_MASTER_PORT_ENV, "29500")
    task_env: dict[str, str] = {}
    spread_tcpstore_port(task_env)
    assert os.environ[DP_MASTER_PORT_ENV] == "29500" and task_env == {}
