"""The LLM replica gpufleet deploys: Ray Serve LLM's ``LLMServer`` with a streaming batcher that
sends the first chunk at once, and, when the replica is the HTTP ingress itself, the API key check.

Ray batches streamed chunks every ``stream_batching_interval_ms`` (50 ms by default) to cut the
per-chunk cost of the replica -> ingress -> proxy hops, but its batcher also waits a whole interval
before the *first* chunk, which adds the interval to every request's time to first token. Here
the first chunk goes out as soon as the engine yields it; later chunks are batched as before.

With ``ingress: direct`` (gpufleet.serve_apps.app) the replica serves vLLM's own OpenAI app and there is no
gpufleet ingress in front of it, so the bearer-token check is added to that app here.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncGenerator, Iterable
from typing import Any, TypeVar

from ray.llm._internal.serve.core.server.llm_server import LLMServer
from ray.llm._internal.serve.utils.batcher import Batcher

from gpufleet.serve_apps import compile_cache
from gpufleet.serve_apps.engine_signals import SLO_SIGNALS_ENV, EngineSignals, engine_metric_values
from gpufleet.serve_apps.http_edge import BearerTokenMiddleware
from gpufleet.serve_apps.startup import StartupClock, process_start_time, spread_tcpstore_port

logger = logging.getLogger("ray.serve")
EXPORT_EVERY_S = 5.0  # vLLM's registry -> Ray's metrics; Ray's own agent reports about as often

T = TypeVar("T")


class FirstChunkBatcher(Batcher[T]):
    """Ray's ``Batcher``, except that the first item is yielded without waiting an interval."""

    async def stream(self) -> AsyncGenerator[Iterable[T], None]:
        if not self.interval_s:  # 0: no batching; None: one batch at the end. Ray's behaviour.
            async for batch in super().stream():
                yield batch
            return
        try:
            first = await self._first_or_done()
            if first:
                yield self._merge_results(first)
            async for batch in super().stream():
                yield batch
        finally:
            if not self.read_task.done():
                self.read_task.cancel()

    async def _first_or_done(self) -> list[T]:
        """Wait until the engine yields its first item (or ends); return what is queued."""
        getter = asyncio.ensure_future(self.queue.get())
        done = asyncio.ensure_future(self.done_event.wait())
        try:
            await asyncio.wait({getter, done}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            done.cancel()
            if not getter.done():
                getter.cancel()
        head = [getter.result()] if getter.done() and not getter.cancelled() else []
        return head + self.drain_queue()


def timed_engine(base: type) -> type:
    """Ray Serve LLM's engine class with its config step marked on the replica's ``StartupClock``. On GPUs that
    step is a Ray task of its own on the replica's GPU (a process that imports vLLM and initialises CUDA to
    build vLLM's config) before vLLM's engine process starts: a part of a replica's start to see apart."""

    class TimedEngine(base):
        def _prepare_engine_config(self, callback_ctx: Any) -> Any:
            out = super()._prepare_engine_config(callback_ctx)
            clock = callback_ctx.custom_data.get("clock")
            if clock is not None:
                clock.mark("engine_config_built")
            return out

    TimedEngine.__name__ = TimedEngine.__qualname__ = f"Timed{base.__name__}"
    return TimedEngine


class GpufleetServer(LLMServer):
    """``LLMServer`` whose streamed responses start without the batching delay and whose own
    HTTP app (direct ingress) checks the API key when one is set."""

    async def __init__(self, llm_config: Any, *, api_key: str | None = None, **kwargs: Any) -> None:
        self._api_key = api_key
        self._clock = StartupClock(process_started=process_start_time(), init_entered=time.time())
        self._startup = llm_config.get_or_create_callback()
        self._startup.ctx.custom_data["clock"] = self._clock
        self._engine_signals = EngineSignals() if os.environ.get(SLO_SIGNALS_ENV) else None
        task_env = self._startup.ctx.runtime_env.setdefault("env_vars", {})
        spread_tcpstore_port(task_env)  # before vLLM's config
        carried = await self._restore_compile_cache(llm_config, task_env)
        await super().__init__(llm_config, **kwargs)
        self._clock.mark("engine_started")
        self._report_startup()
        if carried:  # what this start compiled goes to storage for the next fresh node, off the request path
            asyncio.get_running_loop().create_task(self._save_compile_cache(*carried))
        if not llm_config.log_engine_metrics:  # vLLM keeps them in its own registry: republish them
            self._exporter = asyncio.get_running_loop().create_task(self._export_engine_metrics())

    async def _restore_compile_cache(self, llm_config: Any, task_env: dict[str, str]) -> tuple[str, str, Any] | None:
        """With the spec's ``storage:``, point vLLM's cache at this model's node-local folder (the engine process
        inherits it, vLLM copies it to its Ray workers) and fill that folder from storage on a fresh node;
        return (store, key, folder) for the upload after the start."""
        store = os.environ.get(compile_cache.STORE_ENV)
        if not store:
            return None
        import torch
        import vllm

        key = compile_cache.cache_key(llm_config.model_loading_config.model_source, dict(llm_config.engine_kwargs),
                                      str(llm_config.accelerator_type or "cpu"),
                                      {"vllm": vllm.__version__, "torch": torch.__version__})
        folder = compile_cache.node_folder(key)
        try:
            restored = await asyncio.to_thread(compile_cache.restore, store, key, folder)
        except Exception as e:  # storage out of reach: the replica compiles, as without storage
            logger.warning("compile cache %s not restored from %s: %s", key, store, e)
            restored = False
        os.environ["VLLM_CACHE_ROOT"] = task_env["VLLM_CACHE_ROOT"] = str(folder)
        self._clock.mark("compile_cache_restored")
        logger.info("compile cache %s: %s", key, f"restored from {store}" if restored else f"local ({folder})")
        return store, key, folder

    async def _save_compile_cache(self, store: str, key: str, folder: Any) -> None:
        try:
            if await asyncio.to_thread(compile_cache.save, store, key, folder):
                logger.info("compile cache %s saved to %s", key, store)
        except Exception as e:  # the next fresh node compiles; this replica serves on
            logger.warning("compile cache %s not saved to %s: %s", key, store, e)

    async def _export_engine_metrics(self) -> None:
        """Every few seconds, vLLM's registry as Ray gauges tagged with the model: one read and a few dozen
        gauge sets, where Ray Serve LLM's log_engine_metrics records through Ray on every engine step."""
        from ray.util.metrics import Gauge

        gauges: dict[str, Any] = {}
        tags = {"model": self._llm_config.model_id}
        while True:
            await asyncio.sleep(EXPORT_EVERY_S)
            try:
                for name, value in engine_metric_values().items():
                    if name not in gauges:
                        gauges[name] = Gauge(name, "vLLM engine metric, from the replica's registry",
                                             tag_keys=("model",))
                    gauges[name].set(value, tags=tags)
            except Exception as e:  # a metric vLLM adds later must not stop the replica
                logger.warning("engine metrics export: %s", e)

    def _get_default_engine_class(self) -> type:
        return timed_engine(super()._get_default_engine_class())

    async def _start_engine(self) -> None:
        """Ray Serve LLM's engine start, less its usage report where Ray's usage stats are off (as on every
        cluster `gpufleet up` starts): the report creates a detached actor (a process importing Ray Serve
        LLM) and waits for it before the first replica of a cluster is ready, for a report never sent."""
        from ray._common.usage.usage_lib import usage_stats_enabled

        if usage_stats_enabled():
            return await super()._start_engine()
        if self.engine is None:
            raise ValueError("Engine is not set")
        await self.engine.start()

    def _report_startup(self, http_app: bool = False) -> None:
        """Log the start's breakdown and export it as ``gpufleet_replica_start_seconds{phase}``; a
        replica that is its own HTTP ingress reports again once its app is built."""
        from ray.util.metrics import Gauge

        skipped = bool(self._startup.ctx.custom_data.get("skipped_download"))
        logger.info(self._clock.summary(skipped) if not http_app else
                    f"replica HTTP app built in {self._clock.phases()['http_app']:.1f} s, ready "
                    f"{self._clock.total():.1f} s after its process started")
        gauge = Gauge("gpufleet_replica_start_seconds", "Seconds a replica took to start, per phase",
                      tag_keys=("model", "phase"))
        model = self._llm_config.model_id
        for phase, seconds in {**self._clock.phases(), "total": self._clock.total()}.items():
            gauge.set(seconds, tags={"model": model, "phase": phase})

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """Ray Serve's custom autoscaling metrics: vLLM's own signals for a model with ``slo:``
        (``gpufleet.serve_apps.slo_policy``), none for the others."""
        return self._engine_signals.read() if self._engine_signals else {}

    def _batch_output_stream(self, generator: AsyncGenerator[T, None]) -> AsyncGenerator[Any, None]:
        return FirstChunkBatcher(generator, interval_ms=self._get_batch_interval_ms()).stream()

    async def __serve_build_asgi_app__(self) -> Any:
        app = await super().__serve_build_asgi_app__()
        self._clock.mark("http_app_built")
        self._report_startup(http_app=True)
        if self._api_key:  # outermost: nothing runs for a request without the key
            # vLLM builds its middleware stack eagerly: clear it so Starlette rebuilds it with ours
            app.middleware_stack = None
            app.add_middleware(BearerTokenMiddleware, token=self._api_key)
        return app
