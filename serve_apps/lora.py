"""Serve LoRA adapters from local directories (or storage URIs) beside their base model, on the same replica.

Ray 2.60's Serve LLM loads dynamic LoRA adapters only from cloud storage. gpufleet keeps Ray's
multiplexing (adapters loaded on demand into the running vLLM engine, cached per replica, routed
as ``<model>:<adapter>``) and resolves an adapter name to a local directory instead: first the
spec's explicit ``adapters`` map, then ``<adapters_dir>/<name>``. Copying a new adapter into
``adapters_dir`` makes it servable at once, without restarting the base model.
"""

from __future__ import annotations

import json
import os

from ray.llm._internal.serve.core.ingress.ingress import OpenAiIngress
from ray.llm._internal.serve.utils.lora_serve_utils import LoraModelLoader

from gpufleet.serve_apps.adapters import ADAPTERS_ENV, find_adapter, list_adapters, local_copy
from gpufleet.serve_apps.server import GpufleetServer


class LocalLoraLoader(LoraModelLoader):
    """Resolve ``<base>:<adapter>`` to a local adapter directory instead of downloading it."""

    async def load_model_from_config(self, lora_model_id, llm_config):
        from ray.llm._internal.common.models import global_id_manager
        from ray.llm._internal.common.utils.lora_utils import get_lora_id
        from ray.llm._internal.serve.core.configs.llm_config import DiskMultiplexConfig

        if lora_model_id in self.disk_cache:
            return self.disk_cache[lora_model_id]
        table = json.loads(os.environ.get(ADAPTERS_ENV, "{}"))
        path = find_adapter(table, get_lora_id(lora_model_id))
        if path is None:
            raise ValueError(f"unknown adapter {lora_model_id!r}; known: {list_adapters(table)}")
        cfg = DiskMultiplexConfig(model_id=lora_model_id, max_total_tokens=llm_config.max_request_context_length,
                                  local_path=local_copy(path), lora_assigned_int_id=global_id_manager.next())
        self.disk_cache[lora_model_id] = cfg
        return cfg


class LocalLoraServer(GpufleetServer):
    def _init_multiplex_loader(self, model_downloader_cls=None):
        super()._init_multiplex_loader(LocalLoraLoader)


class GpufleetIngress(OpenAiIngress):
    """Ray's OpenAI ingress, listing and resolving local adapters as ``<model>:<adapter>``."""

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
