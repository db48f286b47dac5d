"""Turn a plan into a Ray placement group, refusing at once what no node could ever hold.

Ray leaves an impossible placement group pending forever. Before creating one, gpufleet compares
it with the cluster's nodes and, when an autoscaler is configured, with the node types it may
launch; if nothing can ever hold it, the error says what was asked and what the largest candidate
offers. A feasible group that waits for capacity times out with what it is still waiting for.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Literal

from pydantic import Field

from cluster.errors import PlanError, fix
from cluster.spec import _Frozen

Strategy = Literal["STRICT_PACK", "PACK", "SPREAD", "STRICT_SPREAD"]
Bundle = dict[str, float]


class NodeCapacity(_Frozen):
    """Total resources of one node, or of one node type an autoscaler may launch ``max_count`` of."""

    name: str
    resources: dict[str, float]
    max_count: int = Field(default=1, ge=0)

    @property
    def gpus(self) -> float:
        return self.resources.get("GPU", 0)

    def holds(self, bundle: Bundle) -> bool:
        return all(self.resources.get(k, 0) >= v for k, v in bundle.items())


def _sum(bundles: Sequence[Bundle]) -> Bundle:
    total: Bundle = {}
    for b in bundles:
        for k, v in b.items():
            total[k] = total.get(k, 0) + v
    return total


def _describe(bundles: Sequence[Bundle]) -> str:
    first = {k: v for k, v in bundles[0].items() if k != "CPU"}
    same = all(b == bundles[0] for b in bundles)
    return f"{len(bundles)} x {first}" if same else str(bundles)


def check_feasible(bundles: Sequence[Bundle], strategy: Strategy, nodes: Sequence[NodeCapacity],
                   node_types: Sequence[NodeCapacity] = ()) -> None:
    """Raise PlanError if no current node or launchable node type can ever hold the group."""
    if not bundles:
        raise PlanError(fix("a placement group needs at least one bundle", "pass a plan with gpus >= 1"))
    candidates = [*nodes, *[t for t in node_types if t.max_count > 0]]
    largest = max(candidates, key=lambda n: (n.gpus, sum(n.resources.values())), default=None)
    offer = f"the largest node offers {largest.resources}" if largest else "the cluster has no nodes"
    asked = f"placement group {_describe(bundles)} ({strategy})"
    for b in bundles:
        if not any(c.holds(b) for c in candidates):
            raise PlanError(fix(f"{asked} can never be placed: no node has {b}; {offer}",
                                "pick the GPU type the cluster has, or add a node type that offers it"))
    if strategy == "STRICT_PACK":
        need = _sum(bundles)
        if not any(c.holds(need) for c in candidates):
            raise PlanError(fix(f"{asked} needs {need} on one node; {offer}",
                                f"use a tensor-parallel size <= {int(largest.gpus) if largest else 0} "
                                "with pipeline stages across nodes, or add a node type with more GPUs"))
    elif strategy == "STRICT_SPREAD":
        slots = sum(c.max_count for c in candidates if any(c.holds(b) for b in bundles))
        if slots < len(bundles):
            raise PlanError(fix(f"{asked} needs {len(bundles)} distinct nodes; only {slots} can hold a bundle",
                                "use SPREAD or PACK, or allow more nodes"))
    else:
        total = _sum(bundles)
        for key, amount in total.items():
            have = sum(c.resources.get(key, 0) * c.max_count for c in candidates)
            if have < amount:
                raise PlanError(fix(f"{asked} needs {amount:g} {key} in all; the cluster can offer {have:g}",
                                    "ask for fewer GPUs or allow more nodes"))


def node_types_from_cluster_config(config: dict[str, Any]) -> list[NodeCapacity]:
    """Launchable worker types of a Ray cluster-launcher config (its ``available_node_types``)."""
    head = config.get("head_node_type")
    return [NodeCapacity(name=name, resources={k: float(v) for k, v in t.get("resources", {}).items()},
                         max_count=int(t.get("max_workers", 0)))
            for name, t in config.get("available_node_types", {}).items() if name != head]


# ---- Ray edge ----------------------------------------------------------------------------------
def cluster_nodes() -> list[NodeCapacity]:
    """Alive nodes of the connected Ray cluster, with their total resources."""
    import ray

    return [NodeCapacity(name=n["NodeManagerAddress"] + ":" + n["NodeID"][:8],
                         resources={k: float(v) for k, v in n["Resources"].items()
                                    if not k.startswith("node:") and k not in ("memory", "object_store_memory")})
            for n in ray.nodes() if n["Alive"]]


def reserve(bundles: Sequence[Bundle], strategy: Strategy, name: str = "", timeout_s: float = 600,
            node_types: Sequence[NodeCapacity] = ()) -> Any:
    """Create a placement group and wait until it is placed (infeasible: error at once)."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    check_feasible(bundles, strategy, cluster_nodes(), node_types)
    pg = placement_group(list(bundles), strategy=strategy, name=name)
    try:
        ray.get(pg.ready(), timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        remove_placement_group(pg)
        free = ray.available_resources()
        raise PlanError(fix(
            f"placement group {name or pg.id.hex()[:8]} {_describe(bundles)} ({strategy}) was not placed within "
            f"{timeout_s:g}s; free now: {{GPU: {free.get('GPU', 0):g}, CPU: {free.get('CPU', 0):g}}}",
            "wait for running jobs to finish, let the autoscaler add nodes, or raise the timeout")) from None
    return pg


def plan_strategy(plan: Any, spread: bool = False) -> Strategy:
    """STRICT_PACK for a tensor-parallel group (one node); PACK for data-parallel workers, or one
    worker per node when asked to spread (Ray's plain SPREAD is best-effort and may still pack)."""
    if spread and plan.tensor_parallel == 1:
        return "STRICT_SPREAD"
    return plan.placement_strategy


def reserve_plan(plan: Any, name: str = "", timeout_s: float = 600, spread: bool = False,
                 node_types: Sequence[NodeCapacity] = ()) -> Any:
    """Reserve the GPUs of a ``Plan`` with ``plan_strategy``; see ``reserve``."""
    return reserve(plan.bundles, plan_strategy(plan, spread), name=name, timeout_s=timeout_s, node_types=node_types)


@contextmanager
def reserved(bundles: Sequence[Bundle], strategy: Strategy, **kwargs: Any) -> Iterator[Any]:
    """A placement group that is removed when the block ends, whatever happens in it."""
    from ray.util.placement_group import remove_placement_group

    pg = reserve(bundles, strategy, **kwargs)
    try:
        yield pg
    finally:
        remove_placement_group(pg)
