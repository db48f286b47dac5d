"""The Ray edge of placement: read the live nodes, create a plan's placement group, wait for it.

Feasibility is decided before anything is created (``catalogue.placement.check_feasible``); a
feasible group that waits for capacity times out with what it is still waiting for.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from catalogue.errors import PlanError, fix
from catalogue.placement import Bundle, NodeCapacity, Placement, Strategy, check_feasible, describe_bundles


def cluster_nodes() -> list[NodeCapacity]:
    """Alive nodes of the connected Ray cluster, with their total resources."""
    import ray

    return [NodeCapacity(name=n["NodeManagerAddress"] + ":" + n["NodeID"][:8],
                         resources={k: float(v) for k, v in n["Resources"].items()
                                    if not k.startswith("node:") and k != "object_store_memory"})
            for n in ray.nodes() if n["Alive"]]


def check_placeable(placement: Placement, node_types: Sequence[NodeCapacity] = ()) -> None:
    """Refuse now what the connected cluster (and its autoscaler's node types) can never hold."""
    check_feasible(placement.bundles, placement.strategy, cluster_nodes(), node_types)


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
            f"placement group {name or pg.id.hex()[:8]} {describe_bundles(bundles)} ({strategy}) was not placed "
            f"within {timeout_s:g}s; free now: {{GPU: {free.get('GPU', 0):g}, CPU: {free.get('CPU', 0):g}}}",
            "wait for running jobs to finish, let the autoscaler add nodes, or raise the timeout")) from None
    return pg


def reserve_placement(placement: Placement, name: str = "", timeout_s: float = 600, spread: bool = False,
                      node_types: Sequence[NodeCapacity] = ()) -> Any:
    """Reserve a plan's placement; ``spread`` puts data-parallel workers one per node (Ray's plain
    SPREAD is best-effort and may still pack)."""
    strategy: Strategy = "STRICT_SPREAD" if spread and placement.strategy == "PACK" else placement.strategy
    return reserve(placement.bundles, strategy, name=name, timeout_s=timeout_s, node_types=node_types)


@contextmanager
def reserved(bundles: Sequence[Bundle], strategy: Strategy, **kwargs: Any) -> Iterator[Any]:
    """A placement group that is removed when the block ends, whatever happens in it."""
    from ray.util.placement_group import remove_placement_group

    pg = reserve(bundles, strategy, **kwargs)
    try:
        yield pg
    finally:
        remove_placement_group(pg)
