"""Which router picks a model's replica: the spec's `router:`, resolved without starting anything."""

import pytest
from pydantic import ValidationError

from gpufleet.serve_apps.app import PREFIX_ROUTER, STARTUP_CALLBACK, llm_config_dict
from gpufleet.serve_apps.spec import ModelEntry, ServeSpec, resolve_router


def entry(tiny_model, **over):
    return ModelEntry(**{"id": "tiny", "source": str(tiny_model), "max_model_len": 256, **over})


def test_auto_routes_on_prefixes_only_when_prompts_share_one_and_there_are_replicas_to_choose(tiny_model):
    assert resolve_router(entry(tiny_model)) == "default"
    assert resolve_router(entry(tiny_model, shared_prefix_tokens=500)) == "default"  # one replica
    assert resolve_router(entry(tiny_model, shared_prefix_tokens=500, replicas={"max": 2})) == "prefix"
    assert resolve_router(entry(tiny_model, router="prefix")) == "prefix"


def test_a_prefix_routed_model_gets_ray_serve_llms_prefix_router_and_cache_hit_counts(tiny_model, tmp_path):
    conf = llm_config_dict(entry(tiny_model, router="prefix", replicas={"max": 2}), tmp_path)
    assert conf["deployment_config"]["request_router_config"] == {"request_router_class": PREFIX_ROUTER}
    assert conf["engine_kwargs"]["enable_prompt_tokens_details"] is True
    plain = llm_config_dict(entry(tiny_model), tmp_path)
    assert "request_router_config" not in plain["deployment_config"]
    assert plain["callback_config"] == {"callback_class": STARTUP_CALLBACK}


def test_prefix_routing_makes_auto_ingress_the_router_even_behind_haproxy(tiny_model):
    spec = ServeSpec(models=[entry(tiny_model, router="prefix")])
    assert spec.ingress_mode(haproxy=True) == "router"
    assert ServeSpec(models=[entry(tiny_model)]).ingress_mode(haproxy=True) == "direct"


def test_prefix_routing_with_direct_ingress_is_refused_naming_the_fix(tiny_model):
    with pytest.raises(ValidationError, match="only the router ingress reads.*set ingress: router"):
        ServeSpec(ingress="direct", models=[entry(tiny_model, router="prefix")])


def test_replicas_sharing_a_gpu_each_get_a_share_of_its_memory_and_its_gpu_resource(tmp_path):
    one = llm_config_dict(ModelEntry(id="m", source="llama-3.2-1b", gpu="H100", max_model_len=2048), tmp_path)
    two = llm_config_dict(ModelEntry(id="m", source="llama-3.2-1b", gpu="H100", max_model_len=2048,
                                     replicas_per_gpu=2, replicas={"min": 2, "max": 2}), tmp_path)
    assert two["engine_kwargs"]["gpu_memory_utilization"] == one["engine_kwargs"]["gpu_memory_utilization"] / 2
    assert [b["GPU"] for b in two["placement_group_config"]["bundles"]] == [0.5]
    # vLLM's Ray worker asks for the same share, else it waits for a whole GPU the bundle does not hold
    assert two["runtime_env"]["env_vars"]["VLLM_RAY_PER_WORKER_GPUS"] == "0.5"
    assert "VLLM_RAY_PER_WORKER_GPUS" not in one["runtime_env"]["env_vars"]


def test_sharing_a_gpu_with_several_gpus_per_replica_a_target_load_or_on_cpus_is_refused_in_one_line(tmp_path, tiny_model):
    from gpufleet.catalogue.errors import PlanError

    with pytest.raises(PlanError, match=r"replicas_per_gpu=2 shares one GPU .* gpus=2 .* drop one of them$"):
        llm_config_dict(ModelEntry(id="m", source="llama-3.2-1b", gpu="H100", replicas_per_gpu=2,
                                   tensor_parallel=2), tmp_path)
    with pytest.raises(PlanError, match="not planned together. To fix: drop one"):
        llm_config_dict(ModelEntry(id="m", source="llama-3.2-1b", gpu="H100", replicas_per_gpu=2,
                                   target_output_tokens_per_s=5000), tmp_path)
    with pytest.raises(PlanError, match="CPU replicas have none"):
        llm_config_dict(entry(tiny_model, replicas_per_gpu=2), tmp_path)


def test_where_every_model_scales_to_zero_the_router_stays_up_on_the_head_without_a_cpu_slot(tiny_model, tmp_path):
    """Ray Serve LLM scales its router to zero with the models; the first request after idle then waits for the
    router's start before the model's (bench/serve/results/cpu-scale-from-zero.json)."""
    from ray.llm._internal.serve.core.ingress.ingress import OpenAiIngress
    from ray.serve.llm import LLMConfig

    from gpufleet.serve_apps.ingress import HEAD_NODE_RESOURCE, GpufleetIngress

    def configs(*mins):
        return [LLMConfig(**llm_config_dict(entry(tiny_model, id=f"m{i}", replicas={"min": m, "max": 2}), tmp_path))
                for i, m in enumerate(mins)]

    assert OpenAiIngress.get_deployment_options(configs(0))["autoscaling_config"]["min_replicas"] == 0  # Ray's
    ours = GpufleetIngress.get_deployment_options(configs(0, 0))
    assert ours["autoscaling_config"]["min_replicas"] == 1
    assert ours["ray_actor_options"] == {"num_cpus": 0, "resources": {HEAD_NODE_RESOURCE: 0.001}}
    assert GpufleetIngress.get_deployment_options(configs(0, 1)) == OpenAiIngress.get_deployment_options(configs(0, 1))


@pytest.mark.slow
def test_the_prefix_router_keeps_its_event_loop_running_while_the_prefix_tree_answers():
    """Ray's PrefixCacheAffinityRouter blocks its loop on the tree actor (``ray.get``); that loop also takes the
    replicas' 0.1 s queue-length replies, and on an H100 the router spun until the ingress missed its health
    checks (serve_apps/prefix_router.py). gpufleet's router awaits the tree and picks the same replica."""
    import asyncio
    import time
    from types import SimpleNamespace

    import ray
    from ray.llm._internal.serve.routing_policies.prefix_aware.prefix_aware_router import (
        PrefixCacheAffinityRouter,
    )
    from ray.llm._internal.serve.routing_policies.prefix_aware.prefix_tree import PrefixTree
    from ray.serve._private.common import DeploymentHandleSource, DeploymentID, ReplicaID, RequestMetadata
    from ray.serve._private.request_router.common import PendingRequest

    from gpufleet.serve_apps.prefix_router import AwaitingPrefixRouter

    @ray.remote(num_cpus=0)
    class SlowTree(PrefixTree):  # a tree actor busy with other routers' calls
        def prefix_match(self, *args):
            time.sleep(0.5)
            return super().prefix_match(*args)

        def insert(self, *args):
            time.sleep(0.5)
            return super().insert(*args)

    deployment = DeploymentID(name="m", app_name="a")
    ids = [ReplicaID(unique_id=f"r{i}", deployment_id=deployment) for i in range(2)]
    replicas = [SimpleNamespace(replica_id=i, max_ongoing_requests=8) for i in ids]
    request = PendingRequest(args=[SimpleNamespace(prompt="You are a support bot. Where is my order?")], kwargs={},
                             metadata=RequestMetadata(request_id="q", internal_request_id="q"))

    async def route(router_cls, tree) -> tuple[list, int, float]:
        """The replicas the router picks, how often a 10 ms timer fired on its loop meanwhile, and how long
        telling it where a request went (``on_request_routed``, which records the prompt in the tree) held it."""
        router = router_cls(deployment_id=deployment, handle_source=DeploymentHandleSource.UNKNOWN,
                            use_replica_queue_len_cache=True)
        router.initialize_state(tree_actor=tree)
        router._replicas = {r.replica_id: r for r in replicas}
        for i in ids:
            router._replica_queue_len_cache.update(i, 0)  # balanced queues: the prefix decides
        ticks = 0

        async def timer():
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        running = asyncio.create_task(timer())
        chosen = await router._prefix_match_best_replicas(request, replicas)
        running.cancel()
        t0 = time.monotonic()
        routed = PendingRequest(args=[SimpleNamespace(prompt=f"{router_cls.__name__} asks")], kwargs={},
                                metadata=RequestMetadata(request_id="r", internal_request_id="r"))
        router.on_request_routed(routed, ids[0], None)
        return [r.replica_id for r in chosen[0]], ticks, time.monotonic() - t0

    ray.init(num_cpus=1, include_dashboard=False, logging_level="ERROR")
    try:
        tree = SlowTree.remote()
        ray.get(tree.add_tenants.remote([i.to_full_id_str() for i in ids], time.time()))
        ray.get(tree.insert.remote("You are a support bot. ", ids[1].to_full_id_str(), time.time()))
        ours, rays = asyncio.run(route(AwaitingPrefixRouter, tree)), asyncio.run(route(PrefixCacheAffinityRouter, tree))
        # both prompts reached the tree, for the replica they went to
        recorded = [ray.get(tree.prefix_match.remote(f"{cls.__name__} asks"))[1]
                    for cls in (AwaitingPrefixRouter, PrefixCacheAffinityRouter)]
    finally:
        ray.shutdown()
    assert ours[0] == rays[0] == [ids[1]]  # the replica holding the prefix, either way
    assert rays[1] == 0  # Ray's loop stood still for the whole answer (once Ray awaits it, drop our subclass)
    assert ours[1] >= 20
    assert rays[2] >= 0.5 and ours[2] < 0.1  # Ray waits for the insert; ours sends it
    assert recorded == [[ids[0].to_full_id_str()]] * 2


class BusyReplica:
    """A replica as the router sees it, whose queue-length probe answers after the router's 0.1 s deadline (a
    replica busy with vLLM's output did on an H100); ``probes`` records who was asked."""

    probes: list[str] = []

    def __init__(self, replica_id, max_ongoing_requests: int = 8):
        self.replica_id, self.max_ongoing_requests = replica_id, max_ongoing_requests

    async def get_queue_len(self, *, deadline_s: float) -> int:
        import asyncio

        self.probes.append(self.replica_id.unique_id)
        await asyncio.sleep(0.2)
        return 0


def prefix_choices(router_cls, held: str, asks: dict[str, tuple[str, dict[int, int]]]) -> dict[str, list[str]]:
    """For each name: the replicas ``router_cls``'s prefix step chooses for a prompt, given the queue lengths the
    router's cache holds ({replica index: length}), when replica r0 already served ``held``. Starts Ray for the
    prefix-tree actor."""
    import asyncio
    import time
    from types import SimpleNamespace

    import ray
    from ray.llm._internal.serve.routing_policies.prefix_aware.prefix_tree import PrefixTreeActor
    from ray.serve._private.common import DeploymentHandleSource, DeploymentID, ReplicaID, RequestMetadata
    from ray.serve._private.request_router.common import PendingRequest

    deployment = DeploymentID(name="m", app_name="a")
    ids = [ReplicaID(unique_id=f"r{i}", deployment_id=deployment) for i in range(2)]
    replicas = [BusyReplica(i) for i in ids]

    async def choose(tree, prompt: str, cached: dict[int, int]) -> list[str]:
        router = router_cls(deployment_id=deployment, handle_source=DeploymentHandleSource.UNKNOWN,
                            use_replica_queue_len_cache=True)
        router.initialize_state(tree_actor=tree)
        router._replicas = {r.replica_id: r for r in replicas}
        for i, n in cached.items():
            router._replica_queue_len_cache.update(ids[i], n)
        request = PendingRequest(args=[SimpleNamespace(prompt=prompt)], kwargs={},
                                 metadata=RequestMetadata(request_id="q", internal_request_id="q"))
        chosen = await router._prefix_match_best_replicas(request, replicas)
        return [r.replica_id.unique_id for r in chosen[0]]

    ray.init(num_cpus=1, include_dashboard=False, logging_level="ERROR")
    try:
        tree = PrefixTreeActor.options(num_cpus=0).remote()
        ray.get(tree.add_tenants.remote([i.to_full_id_str() for i in ids], time.time()))
        ray.get(tree.insert.remote(held, ids[0].to_full_id_str(), time.time()))
        return {name: asyncio.run(choose(tree, prompt, cached)) for name, (prompt, cached) in asks.items()}
    finally:
        ray.shutdown()


SUPPORT = "You are a support bot. "


@pytest.mark.slow
def test_the_prefix_router_reads_queue_lengths_from_its_cache_and_never_probes_a_replica():
    """Ray's prefix step probes every replica missing from the queue-length cache with a 0.1 s deadline that
    never backs off; on an H100 a busy replica answered later than that, and one ingress sent 10,000 probes a
    second. gpufleet's step reads the cache only: the replica holding the prefix is chosen while the cache
    says it has room, and otherwise the request goes to Ray's power-of-two fallback (an empty choice)."""
    from ray.llm._internal.serve.routing_policies.prefix_aware.prefix_aware_router import (
        PrefixCacheAffinityRouter,
    )

    from gpufleet.serve_apps.prefix_router import AwaitingPrefixRouter

    BusyReplica.probes.clear()
    prompt = SUPPORT + "Where is my order?"
    ours = prefix_choices(AwaitingPrefixRouter, SUPPORT, {
        "room": (prompt, {0: 3, 1: 0}), "full": (prompt, {0: 8, 1: 0}), "unknown": (prompt, {1: 0})})
    ours_probed = list(BusyReplica.probes)
    rays = prefix_choices(PrefixCacheAffinityRouter, SUPPORT, {"unknown": (prompt, {1: 0})})
    assert ours == {"room": ["r0"], "full": [], "unknown": []}
    assert ours_probed == []
    assert BusyReplica.probes == ["r0"] and rays == {"unknown": ["r0"]}  # Ray probed the replica it did not know


@pytest.mark.slow
def test_a_prompt_sharing_no_prefix_goes_to_the_power_of_two_choice_not_the_replica_holding_least_text():
    """Ray sends a prompt whose match is too short to the replicas holding the fewest characters in the tree,
    whatever their load; on an H100 that made random prompts' TTFT p50 1.7x the default router's. gpufleet hands
    such a prompt to Ray's power-of-two choice (an empty choice), which picks by queue length."""
    from ray.llm._internal.serve.routing_policies.prefix_aware.prefix_aware_router import (
        PrefixCacheAffinityRouter,
    )

    from gpufleet.serve_apps.prefix_router import AwaitingPrefixRouter

    asks = {"no prefix": ("Translate this poem into French.", {0: 0, 1: 6})}
    assert prefix_choices(PrefixCacheAffinityRouter, SUPPORT, asks) == {"no prefix": ["r1"]}  # the busier one
    assert prefix_choices(AwaitingPrefixRouter, SUPPORT, asks) == {"no prefix": []}


@pytest.mark.slow
def test_a_popped_request_is_routed_even_when_more_routing_tasks_run_than_requests_wait():
    """Ray 2.58's routing loop (the GPU image's Ray) drops a request it has popped when, while the router chooses,
    the routing tasks come to outnumber the waiting requests; the caller then waits forever. gpufleet's router
    runs Ray 2.60's loop there (``route_pending_requests``): the request is routed, and the task that then finds
    the queue empty ends instead of choosing replicas for no request. Ray 2.58 itself cannot run here (it is built
    for the GPU machine's Python), so this checks gpufleet's loop on the installed Ray."""
    import asyncio
    from types import SimpleNamespace

    import ray
    from ray.serve._private.common import DeploymentHandleSource, DeploymentID, ReplicaID, RequestMetadata
    from ray.serve._private.request_router.common import PendingRequest

    from gpufleet.serve_apps.prefix_router import AwaitingPrefixRouter, route_pending_requests

    deployment = DeploymentID(name="m", app_name="a")
    replica = SimpleNamespace(replica_id=ReplicaID(unique_id="r0", deployment_id=deployment), max_ongoing_requests=8,
                              node_id=None, availability_zone=None, multiplexed_model_ids=set())

    class SlowChoice(AwaitingPrefixRouter):
        async def choose_replicas(self, candidate_replicas, pending_request=None):
            others = [asyncio.get_running_loop().create_future() for _ in range(3)]
            self._routing_tasks.update(others)  # tasks started for requests routed meanwhile
            await asyncio.sleep(0.05)  # the prefix tree's answer
            return [[replica]]

    async def route() -> tuple[str, int]:
        router = SlowChoice(deployment_id=deployment, handle_source=DeploymentHandleSource.UNKNOWN,
                            use_replica_queue_len_cache=True)
        router.initialize_state(tree_actor=object())
        router._replicas, router._replicas_list = {replica.replica_id: replica}, [replica]
        router._replica_id_set = {replica.replica_id}
        router._replica_queue_len_cache.update(replica.replica_id, 0)
        pending = PendingRequest(args=[], kwargs={}, metadata=RequestMetadata(request_id="q", internal_request_id="q"))
        for queue in (router._pending_requests_to_fulfill, router._pending_requests_to_route):
            queue.append(pending)
        router._add_pending_request_to_indices(pending)
        task = asyncio.get_running_loop().create_task(route_pending_requests(router))
        router._routing_tasks.add(task)
        chosen = await asyncio.wait_for(pending.future, 5)
        await asyncio.wait_for(task, 5)  # the queue is empty: the task ends
        return chosen.replica_id.unique_id, len(router._pending_requests_to_route)

    ray.init(num_cpus=1, include_dashboard=False, logging_level="ERROR")
    try:
        routed, left = asyncio.run(route())
    finally:
        ray.shutdown()
    assert (routed, left) == ("r0", 0)
