"""Ray Serve LLM's prefix-cache affinity router, with its prefix-tree calls awaited instead of blocking.

``PrefixCacheAffinityRouter`` (Ray 2.58-2.60) asks its prefix-tree actor which replica holds a prompt's prefix
with a blocking ``ray.get`` inside the router's async ``choose_replicas``, and ``ray.get``s every insert in
``on_request_routed``. On an H100 with two replicas of a 1B model at 16 concurrent 1,088-token prompts, the
ingress then missed its health checks and requests stalled for minutes, with 1.5 million profile events in one
task of the router and 160,000 calls waiting to go to the replicas (docs/benchmarks.md). What the logs fit: the
router's loop stops for each round trip to the tree, the same loop receives the replicas' queue-length
replies, whose deadline (0.1 s, never backed off on this path) runs out meanwhile, and a request whose probes
all time out is routed again, asks the tree again, and so on.
Here the tree is awaited, so the loop keeps serving probe replies, and an insert is sent without waiting
(calls from one caller reach the actor in order, so the next match still sees it). Routing decisions are
Ray's, unchanged.
"""

from __future__ import annotations

import time

from ray.llm._internal.serve.routing_policies.prefix_aware.prefix_aware_router import (
    PrefixCacheAffinityRouter,
)
from ray.serve._private.common import ReplicaID
from ray.serve._private.replica_result import ReplicaResult
from ray.serve._private.request_router.common import PendingRequest
from ray.serve._private.request_router.replica_wrapper import RunningReplica


class AwaitingPrefixRouter(PrefixCacheAffinityRouter):
    async def _prefix_match_best_replicas(self, pending_request: PendingRequest | None,
                                          candidate_replicas: list[RunningReplica]) -> list[list[RunningReplica]]:
        """Ray's choice (balanced queues: the replicas holding the longest prefix, or with too short a match the
        ones holding the fewest characters), with the tree's answers awaited."""
        chosen: list[str] = []
        text = (self._extract_text_from_request(pending_request)
                if pending_request is not None and pending_request.args else None)
        if text is not None and not self._imbalanced(await self._queue_lens(candidate_replicas)):
            matched, tenants = await self._tree_actor.prefix_match.remote(
                text, [r.replica_id.to_full_id_str() for r in candidate_replicas])
            if len(matched) / max(len(text), 1) < self._match_rate_threshold:
                tenants = await self._tree_actor.get_smallest_tenants.remote()
            chosen = tenants or []
        return [[self._replicas[ReplicaID.from_full_id_str(t)] for t in chosen]]

    async def _queue_lens(self, replicas: list[RunningReplica]) -> list[int]:
        """Known queue lengths: the cache's where fresh and below capacity, else one probe (as Ray does)."""
        lens, probe = [], list(replicas)
        if self._use_replica_queue_len_cache:
            probe = []
            for r in replicas:
                n = self._replica_queue_len_cache.get(r.replica_id)
                if n is None or n >= r.max_ongoing_requests:
                    probe.append(r)
                else:
                    lens.append(n)
        if probe:
            lens += [n for _, n in await self._probe_queue_lens(probe, 0) if n is not None]
        return lens

    def _imbalanced(self, lens: list[int]) -> bool:
        return bool(lens) and max(lens) - min(lens) > self._imbalanced_threshold

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID,
                          result: ReplicaResult) -> None:
        if pending_request is not None and pending_request.args:
            text = self._extract_text_from_request(pending_request)
            if text is not None:
                self._tree_actor.insert.remote(text, replica_id.to_full_id_str(), time.time())
