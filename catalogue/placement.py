"""Placement as data: the bundles a plan reserves, and whether any node could ever hold them.

Ray leaves an impossible placement group pending forever. Before one is created, gpufleet
compares it with the cluster's nodes and, when an autoscaler is configured, with the node types
it may launch; if nothing can ever hold it, the error says what was asked and what the largest
candidate offers. Pure: the Ray edge that reads nodes and creates groups is ``gpufleet.cluster.placement``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from pydantic import Field

from gpufleet.catalogue.config import Config
from gpufleet.catalogue.errors import PlanError, fix
from gpufleet.catalogue.gpus import GIB

Strategy = Literal["STRICT_PACK", "PACK", "SPREAD", "STRICT_SPREAD"]
Bundle = dict[str, float]
ACCELERATOR_PREFIX = "accelerator_type:"
# Ray's own convention for pinning a GPU type: a sliver of the node's accelerator_type resource.
ACCELERATOR_SLIVER = 0.001
MEMORY = "memory"  # Ray's host-memory resource, in bytes


class Placement(Config):
    """What Ray reserves for one replica or job: one bundle per worker (GPU) and a strategy.

    The same object feeds Ray Train's ``ScalingConfig`` and Ray Serve LLM's
    ``placement_group_config``, and is what ``gpufleet plan`` prints.
    """

    bundles: list[Bundle] = Field(min_length=1, description="One resource dict per worker or TP rank.")
    strategy: Strategy = Field(description="STRICT_PACK keeps a tensor-parallel group in one node.")

    @property
    def accelerator_type(self) -> str | None:
        """The GPU type the bundles are pinned to (Ray's ``accelerator_type``), if any."""
        return next((k.removeprefix(ACCELERATOR_PREFIX) for k in self.bundles[0] if k.startswith(ACCELERATOR_PREFIX)),
                    None)

    @property
    def resources_per_worker(self) -> Bundle:
        """One bundle without the accelerator pin (Ray Train adds that back from ``accelerator_type``)."""
        return {k: v for k, v in self.bundles[0].items() if not k.startswith(ACCELERATOR_PREFIX)}

    @property
    def use_gpu(self) -> bool:
        return self.bundles[0].get("GPU", 0) > 0

    def describe(self) -> str:
        return f"{describe_bundles(self.bundles)} ({self.strategy})"


def worker_bundles(workers: int, gpus: int, cpus: float, accelerator_type: str | None,
                   host_memory: int = 0) -> list[Bundle]:
    """``workers`` identical bundles: ``gpus`` GPUs (pinned to a GPU type), ``cpus`` CPUs and, where
    a worker keeps state in host RAM (ZeRO offload), that many bytes of Ray's ``memory`` resource."""
    b: Bundle = {}
    if gpus:
        b["GPU"] = float(gpus)
        if accelerator_type:
            b[ACCELERATOR_PREFIX + accelerator_type] = ACCELERATOR_SLIVER
    b["CPU"] = float(cpus)
    if host_memory:
        b[MEMORY] = float(host_memory)
    return [dict(b) for _ in range(workers)]


class NodeCapacity(Config):
    """Total resources of one node, or of one node type an autoscaler may launch ``max_count`` of."""

    name: str
    resources: dict[str, float]
    max_count: int = Field(default=1, ge=0)

    @property
    def gpus(self) -> float:
        return self.resources.get("GPU", 0)

    def holds(self, bundle: Bundle) -> bool:
        # A node type that does not declare its memory (cluster.yaml usually leaves it to the
        # instance type) is not refused for it: Ray checks memory when the node exists.
        return all(self.resources.get(k, 0) >= v for k, v in bundle.items()
                   if not (k == MEMORY and k not in self.resources))


def sum_bundles(bundles: Sequence[Bundle]) -> Bundle:
    """Resources of several bundles added up key by key."""
    total: Bundle = {}
    for b in bundles:
        for k, v in b.items():
            total[k] = total.get(k, 0) + v
    return total


def describe_bundles(bundles: Sequence[Bundle]) -> str:
    first = {k: v for k, v in bundles[0].items() if k != "CPU"}
    same = all(b == bundles[0] for b in bundles)
    return f"{len(bundles)} x {first}" if same else str(list(bundles))


def check_feasible(bundles: Sequence[Bundle], strategy: Strategy, nodes: Sequence[NodeCapacity],
                   node_types: Sequence[NodeCapacity] = ()) -> None:
    """Raise PlanError if no current node or launchable node type can ever hold the group."""
    if not bundles:
        raise PlanError(fix("a placement group needs at least one bundle", "pass a plan with gpus >= 1"))
    candidates = [*nodes, *[t for t in node_types if t.max_count > 0]]
    largest = max(candidates, key=lambda n: (n.gpus, sum(n.resources.values())), default=None)
    offer = f"the largest node offers {largest.resources}" if largest else "the cluster has no nodes"
    asked = f"placement group {describe_bundles(bundles)} ({strategy})"
    for b in bundles:
        if not any(c.holds(b) for c in candidates):
            without_memory = {k: v for k, v in b.items() if k != "memory"}
            if "memory" in b and any(c.holds(without_memory) for c in candidates):
                most = max(c.resources.get("memory", 0) for c in candidates if c.holds(without_memory))
                raise PlanError(fix(f"{asked} can never be placed: each worker needs {b['memory'] / GIB:.0f} GiB of "
                                    f"host memory (ZeRO offload) and the largest node with its GPU type offers "
                                    f"{most / GIB:.0f} GiB to Ray",
                                    "add a node type with more RAM, or pin more GPUs (--gpus / plan.workers: ZeRO "
                                    "shards the offloaded state)"))
            raise PlanError(fix(f"{asked} can never be placed: no node has {b}; {offer}",
                                "pick the GPU type the cluster has, or add a node type that offers it"))
    if strategy == "STRICT_PACK":
        need = sum_bundles(bundles)
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
        for key, amount in sum_bundles(bundles).items():
            if key == MEMORY and any(MEMORY not in c.resources for c in candidates):
                continue  # unknown where a node (type) does not declare it, as in ``NodeCapacity.holds``
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


def largest_node_gpus(accelerator_type: str, candidates: Sequence[NodeCapacity]) -> int | None:
    """GPUs of the largest node (or launchable node type) carrying ``accelerator_type``; None if none does."""
    label = ACCELERATOR_PREFIX + accelerator_type
    return max((int(c.gpus) for c in candidates if c.resources.get(label) and c.max_count > 0 and c.gpus), default=None)
