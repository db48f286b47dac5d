"""gpufleet's OpenAI router (``ingress: router``): Ray Serve LLM's ingress, listing and resolving local LoRA
adapters as ``<model>:<adapter>``, and sending a request whose replica died before its first byte to another
replica.

A replica that dies (its process killed, its node lost) fails every request it holds. Those that had not
yet sent a byte to the client are safe to run again, and Ray Serve's handle already routes around a dead
replica, so they are retried, up to ``REPLICA_RETRIES`` times. A stream cut after its first chunk is not
(the client has part of an answer): it ends with an OpenAI error event, which clients raise, rather than
a connection cut mid-body.
"""

from __future__ import annotations

import logging
from typing import Any

from ray.exceptions import RayActorError
from ray.llm._internal.serve.core.ingress.ingress import OpenAiIngress

from gpufleet.serve_apps.adapters import find_adapter, list_adapters

REPLICA_RETRIES = 2
HEAD_NODE_RESOURCE = "node:__internal_head__"  # Ray gives every head node one unit of it
logger = logging.getLogger("ray.serve")


class GpufleetIngress(OpenAiIngress):
    """Ray's OpenAI ingress, listing and resolving local adapters as ``<model>:<adapter>``."""

    @classmethod
    def get_deployment_options(cls, llm_configs: list | None = None) -> dict[str, Any]:
        """Ray Serve LLM's router options, except where every model scales to zero. Ray then scales the router
        to zero too, so the first request after idle waits for the router's start and only then, when the
        router asks for it, for the model's replica: 17 of 41 s on a 2-core CPU
        (bench/serve/results/cpu-scale-from-zero.json). One router replica stays up instead, on the head
        node and taking no CPU slot (as Serve's proxy there does), so it holds no worker node."""
        options = super().get_deployment_options(llm_configs)
        scaling = options.get("autoscaling_config") or {}
        if scaling.get("min_replicas") == 0:
            scaling["min_replicas"] = 1
            options["ray_actor_options"] = {**options.get("ray_actor_options", {}), "num_cpus": 0,
                                            "resources": {HEAD_NODE_RESOURCE: 0.001}}
        return options

    def __init__(self, llm_deployments, model_cards, lora_paths=None, adapters=None, **kwargs):
        super().__init__(llm_deployments, model_cards, lora_paths={}, **kwargs)
        self._adapters: dict[str, dict] = adapters or {}  # base model id -> adapters table

    async def model(self, model_id: str):
        from ray.llm._internal.serve.core.configs.openai_api_models import ModelCard

        if model_id in self._model_cards:
            return self._model_cards[model_id]
        base, _, name = model_id.partition(":")
        if base in self._adapters and find_adapter(self._adapters[base], name):
            card = self._model_cards[base]
            return ModelCard(id=model_id, object="model", owned_by=card.owned_by, permission=list(card.permission),
                             metadata={**card.metadata, "base_model": base, "adapter": name})
        return None

    async def models(self):
        from ray.llm._internal.serve.core.configs.openai_api_models import ModelList

        ids = list(self._model_cards) + [f"{b}:{n}" for b, t in self._adapters.items() for n in list_adapters(t)]
        return ModelList(data=[await self.model(i) for i in ids])

    async def _get_response(self, *, body: Any, call_method: str, raw_request: Any = None):
        for attempt in range(REPLICA_RETRIES + 1):
            started = False
            try:
                async for response in super()._get_response(body=body, call_method=call_method,
                                                            raw_request=raw_request):
                    started = True
                    yield response
                return
            except RayActorError as e:  # ActorDiedError, ActorUnavailableError
                if started and getattr(body, "stream", False):
                    logger.warning("replica lost mid-stream (%s): the stream ends with an error", type(e).__name__)
                    yield replica_lost(e)
                    return
                if started or attempt == REPLICA_RETRIES:
                    raise
                logger.warning("replica lost before its first byte (%s); retrying on another replica",
                               type(e).__name__)


def replica_lost(error: Exception) -> Any:
    """The error event that ends a stream whose replica died."""
    from ray.llm._internal.serve.core.configs.openai_api_models import ErrorInfo, ErrorResponse

    return ErrorResponse(error=ErrorInfo(
        message=f"the replica serving this stream was lost ({type(error).__name__}); send the request again",
        type="ServiceUnavailableError", code=503))
