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
(calls from one caller reach the actor in order, so the next match still sees it).
With that fixed, a second H100 run still stalled: 700,000 queue-length probes timed out at 0.1 s in one
ingress, 10,000 a second, all from the prefix step, which probes every replica the cache does not hold
(an idle replica's entry expires after 10 s) at a deadline that never backs off. Here that step reads the
cache only; probing stays with Ray's replica selection, which backs off. Where the replicas holding the prefix
are full or unknown to the cache, the request goes to Ray's power-of-two choice rather than waiting for them,
as does a prompt that shares no prefix (Ray sends it to the replica holding the fewest characters, whatever its
load).
On Ray 2.58 (what the GPU recipe carries) the routing loop itself loses requests under this router; there it
runs Ray 2.60's loop (``route_pending_requests``).
"""

from __future__ import annotations

import asyncio
import logging
import time

from ray.llm._internal.serve.routing_policies.prefix_aware.prefix_aware_router import (
    PrefixCacheAffinityRouter,
)
from ray.serve._private.common import ReplicaID
from ray.serve._private.replica_result import ReplicaResult
from ray.serve._private.request_router.common import PendingRequest
from ray.serve._private.request_router.replica_wrapper import RunningReplica
from ray.serve._private.request_router.request_router import RequestRouter

logger = logging.getLogger("ray.serve")
# Ray before 2.60 (2.58.1 is the newest that runs with the vLLM the GPU recipe carries) drops requests in its
# routing loop; 2.60 added this method along with the fix
RAY_DROPS_POPPED_REQUESTS = not hasattr(RequestRouter, "_cancel_routing_task_for_pending_request")


async def route_pending_requests(router: RequestRouter) -> None:
    """A routing task's loop as Ray 2.60 runs it, for Ray 2.58. Ray 2.58's loop pops a request from the routing
    queue and then leaves the loop, dropping it, whenever more routing tasks run than requests wait (the count
    falls as other tasks finish), so the request's caller waits forever; and a task that finds the queue empty
    keeps choosing (and probing) replicas for no request. A prefix router, which awaits its tree between the pop
    and the choice, meets both under load. Here a popped request is routed until it is done, and an empty queue
    ends the task."""
    try:
        while len(router._routing_tasks) <= router.target_num_routing_tasks:
            pending = router._get_next_pending_request_to_route()
            if pending is None:
                break
            choices = router._choose_replicas_with_backoff(pending)
            attempt = 0
            try:
                async for candidates in choices:
                    if pending.future.done():
                        break
                    replica = await router._select_from_candidate_replicas(candidates, attempt)
                    if replica is not None:
                        router._fulfill_next_pending_request(replica, pending.metadata)
                        break
                    attempt += 1
            finally:
                await choices.aclose()
    except Exception:
        logger.exception("Unexpected error while routing a request.")
    finally:
        queue = router._pending_requests_to_fulfill
        while queue and queue[0].future.done():
            queue.popleft()
        router._routing_tasks.discard(asyncio.current_task())
        router.num_routing_tasks_gauge.set(router.curr_num_routing_tasks)
        if router._pending_requests_to_route:
            router._maybe_start_routing_tasks()


class AwaitingPrefixRouter(PrefixCacheAffinityRouter):
    if RAY_DROPS_POPPED_REQUESTS:
        async def _fulfill_pending_requests(self) -> None:
            await route_pending_requests(self)

    async def _prefix_match_best_replicas(self, pending_request: PendingRequest | None,
                                          candidate_replicas: list[RunningReplica]) -> list[list[RunningReplica]]:
        """The replicas holding the longest prefix, with the tree's answer awaited and queue lengths read from the
        router's cache only. An empty choice hands the request to Ray's power-of-two fallback: so does a prompt
        whose match is too short, where Ray picks the replicas holding the fewest characters whatever their
        load. On an H100 (two replicas of a 1B model, random 1,088-token prompts at 16 concurrent) that choice
        took TTFT p50 from 55 ms (the default router) to 92 ms and throughput to 0.92x (docs/benchmarks.md);
        a prefix seen once is in the tree wherever it went, so the choice by load loses no later hit."""
        chosen: list[RunningReplica] = []
        text = (self._extract_text_from_request(pending_request)
                if pending_request is not None and pending_request.args else None)
        if text is not None and not self._imbalanced(self._cached_queue_lens(candidate_replicas)):
            matched, tenants = await self._tree_actor.prefix_match.remote(
                text, [r.replica_id.to_full_id_str() for r in candidate_replicas])
            if len(matched) / max(len(text), 1) >= self._match_rate_threshold:
                chosen = [r for r in (self._replicas.get(ReplicaID.from_full_id_str(t)) for t in tenants or [])
                          if r is not None and self._has_room(r)]
        return [chosen]

    def _has_room(self, replica: RunningReplica) -> bool:
        """Whether the cache says the replica takes another request. One it does not know (or knows full) would
        be probed before each try, so the request goes to Ray's power-of-two choice instead."""
        n = self._replica_queue_len_cache.get(replica.replica_id)
        return n is not None and n < replica.max_ongoing_requests

    def _cached_queue_lens(self, replicas: list[RunningReplica]) -> list[int]:
        """Queue lengths the router already knows. Ray probes the others here with a fixed 0.1 s deadline; on an
        H100 a replica busy with vLLM's output answered later than that, and the router re-sent those probes
        some 10,000 times a second (docs/benchmarks.md)."""
        lens = (self._replica_queue_len_cache.get(r.replica_id) for r in replicas)
        return [n for n in lens if n is not None]

    def _imbalanced(self, lens: list[int]) -> bool:
        return bool(lens) and max(lens) - min(lens) > self._imbalanced_threshold

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID,
                          result: ReplicaResult) -> None:
        if pending_request is not None and pending_request.args:
            text = self._extract_text_from_request(pending_request)
            if text is not None:
                self._tree_actor.insert.remote(text, replica_id.to_full_id_str(), time.time())
