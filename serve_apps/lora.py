"""Serve LoRA adapters from local directories (or storage URIs) beside their base model, on the same replica.

Ray 2.60's Serve LLM loads dynamic LoRA adapters only from cloud storage. gpufleet keeps Ray's
multiplexing (adapters loaded on demand into the running vLLM engine, cached per replica, routed
as ``<model>:<adapter>``) and resolves an adapter name to a local directory instead: first the
spec's explicit ``adapters`` map, then ``<adapters_dir>/<name>``. Copying a new adapter into
``adapters_dir`` makes it servable at once, without restarting the base model, and an adapter re-published
under the same name (``publish:`` in a train spec; ``gpufleet.cluster.adapter_store``) replaces the loaded one in
place on the next request that names it, once its version has changed (checked at most every
``ADAPTER_RECHECK_S`` per adapter and replica).
"""

from __future__ import annotations

import asyncio
import json
import os
import time

from ray.llm._internal.serve.utils.lora_serve_utils import LoraModelLoader

from gpufleet.cluster.adapter_store import adapter_version
from gpufleet.serve_apps.adapters import ADAPTERS_ENV, find_adapter, list_adapters, local_copy
from gpufleet.serve_apps.server import GpufleetServer

ADAPTER_RECHECK_S = 2.0


class LocalLoraLoader(LoraModelLoader):
    """Resolve ``<base>:<adapter>`` to a local adapter directory instead of downloading it, and notice when
    it is re-published. One replica, one loader: the replica finds it as ``LocalLoraLoader.current``."""

    current: LocalLoraLoader | None = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.versions: dict[str, tuple[str, str | None, float]] = {}  # id -> (location, version, checked at)
        LocalLoraLoader.current = self

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
        version = adapter_version(path)
        cfg = DiskMultiplexConfig(model_id=lora_model_id, max_total_tokens=llm_config.max_request_context_length,
                                  local_path=local_copy(path, version=version),
                                  lora_assigned_int_id=global_id_manager.next())
        self.disk_cache[lora_model_id] = cfg
        self.versions[lora_model_id] = (path, version, time.monotonic())
        return cfg

    def republished(self, lora_model_id: str):
        """The adapter's new config where it was re-published since it was loaded, else None."""
        known = self.versions.get(lora_model_id)
        if known is None or time.monotonic() - known[2] < ADAPTER_RECHECK_S:
            return None
        path, version, _ = known
        new = adapter_version(path)
        self.versions[lora_model_id] = (path, new or version, time.monotonic())
        if new is None or new == version:
            return None
        cfg = self.disk_cache[lora_model_id].model_copy(update={"local_path": local_copy(path, version=new)})
        self.disk_cache[lora_model_id] = cfg
        return cfg


class LocalLoraServer(GpufleetServer):
    def _init_multiplex_loader(self, model_downloader_cls=None):
        super()._init_multiplex_loader(LocalLoraLoader)

    async def _maybe_resolve_lora_from_multiplex(self) -> None:
        await super()._maybe_resolve_lora_from_multiplex()
        from ray import serve

        model_id = serve.get_multiplexed_model_id()
        loader = LocalLoraLoader.current
        # the version check reads the store (a bucket, perhaps) and a new version is copied: off the event loop
        if model_id and loader and (fresh := await asyncio.to_thread(loader.republished, model_id)):
            from vllm.entrypoints.serve.lora.protocol import LoadLoRAAdapterRequest

            # Ray Serve LLM's engine loads a name once; vLLM replaces an adapter's weights under the same name
            # when asked to load it in place.
            result = await self.engine._oai_models.load_lora_adapter(request=LoadLoRAAdapterRequest(
                lora_name=model_id, lora_path=fresh.local_path, load_inplace=True))
            if getattr(result, "error", None):  # vLLM answers an error response rather than raising
                raise ValueError(f"re-published adapter {model_id} did not load: {result.error.message}")
