"""The Ray edge of placement: read the live nodes, create a plan's placement group, wait for it.

Feasibility is decided before anything is created (``gpufleet.catalogue.placement.check_feasible``); a
feasible group that waits for capacity times out with what it is still waiting for.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from gpufleet.catalogue.errors import PlanError, fix
from gpufleet.catalogue.placement import (
    Bundle,
    NodeCapacity,
    Placement,
    Strategy,
    check_feasible,
    describe_bundles,
    node_types_from_cluster_config,
    sum_bundles,
)
from gpufleet.cluster.head import default_state_dir

# `ray up` leaves the autoscaler's config on the head, where `ray job submit` drivers run.
BOOTSTRAP_CONFIG = Path("~/ray_bootstrap_config.yaml")
NODE_TYPES_FILE = "node_types.json"  # what `gpufleet up --cluster` recorded, for drivers off the head


def cluster_nodes() -> list[NodeCapacity]:
    """Alive nodes of the connected Ray cluster, with their total resources."""
    import ray

    return [NodeCapacity(name=n["NodeManagerAddress"] + ":" + n["NodeID"][:8],
                         resources={k: float(v) for k, v in n["Resources"].items()
                                    if not k.startswith("node:") and k != "object_store_memory"})
            for n in ray.nodes() if n["Alive"]]


def autoscaler_node_types(state_dir: Path | None = None) -> list[NodeCapacity]:
    """The node types the cluster's autoscaler can launch: from the config named by
    GPUFLEET_AUTOSCALER_CONFIG, the one `ray up` leaves on the head, or the types `gpufleet up --cluster`
    recorded; none if the cluster does not autoscale."""
    for name in (os.environ.get("GPUFLEET_AUTOSCALER_CONFIG"), BOOTSTRAP_CONFIG):
        path = Path(name).expanduser() if name else None
        if path and path.is_file():
            return node_types_from_cluster_config(yaml.safe_load(path.read_text()) or {})
    recorded = (state_dir or default_state_dir()) / NODE_TYPES_FILE
    if recorded.is_file():
        return [NodeCapacity(**t) for t in json.loads(recorded.read_text())]
    return []


def record_node_types(config: dict[str, Any], state_dir: Path | None = None) -> Path:
    """Keep a cluster config's launchable node types for later checks from this machine."""
    target = (state_dir or default_state_dir()) / NODE_TYPES_FILE
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps([t.model_dump() for t in node_types_from_cluster_config(config)], indent=1))
    return target


def check_placeable(placement: Placement, node_types: Sequence[NodeCapacity] | None = None) -> str | None:
    """Refuse now what the connected cluster and its autoscaler's node types can never hold. Returns
    a line to show when only a node type the autoscaler has yet to launch can hold it."""
    nodes = cluster_nodes()
    types = autoscaler_node_types() if node_types is None else list(node_types)
    check_feasible(placement.bundles, placement.strategy, nodes, types)
    try:
        check_feasible(placement.bundles, placement.strategy, nodes)
    except PlanError:
        whole = [sum_bundles(placement.bundles)] if placement.strategy == "STRICT_PACK" else placement.bundles
        fit = [t.name for t in types if t.max_count > 0 and all(t.holds(b) for b in whole)]
        return (f"no running node can hold {describe_bundles(placement.bundles)} yet: waiting for the autoscaler to "
                f"launch {' or '.join(fit) or 'nodes of its types'}")
    return None


def spans_nodes(placement: Placement) -> bool:
    """Whether no single live node or launchable node type could hold all of the group's bundles."""
    try:
        check_feasible(placement.bundles, "STRICT_PACK", cluster_nodes(), autoscaler_node_types())
    except PlanError:
        return True
    return False


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
