"""A single-GPU replica runs its model the way plain ``vllm serve`` does: in vLLM's engine-core
process, not in a separate Ray worker actor.

Ray Serve LLM always gives vLLM its Ray executor on GPUs. For a replica of one GPU that puts a
``RayWorkerProc`` actor between vLLM's scheduler and the model: every engine step is a Ray call,
and the actor busy-polls a core (measured on an H100 with Llama-3.2-1B: ~1 core per replica, 3-10%
of output throughput at concurrency 8-256, see bench/serve/results/h100-serve.json). Here the
replica actor itself holds the GPU from its placement bundle and vLLM runs with its ``uni``
executor, which is what ``vllm serve`` picks for one GPU. Replicas of several GPUs (tensor or
pipeline parallel) keep Ray's executor: their workers are the placement group's bundles.
"""

from __future__ import annotations

from typing import Any

from ray.llm._internal.serve.core.configs.accelerators import GPUAccelerator


def runs_in_process(engine_config: Any) -> bool:
    """Whether a replica with this ``VLLMEngineConfig`` runs vLLM in its own engine process: one
    GPU, no data parallelism and no KV transfer (those need vLLM's distributed machinery)."""
    kwargs = engine_config.engine_kwargs
    return (isinstance(engine_config.accelerator, GPUAccelerator) and engine_config.num_devices == 1
            and int(kwargs.get("data_parallel_size", 1)) == 1 and not kwargs.get("kv_transfer_config"))


def in_process_engine_class() -> type:
    """``VLLMEngine`` with vLLM's ``uni`` executor (imported here: it needs vLLM, the driver may not)."""
    from ray.llm._internal.serve.engines.vllm import vllm_engine
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.usage.usage_lib import UsageContext

    class InProcessVLLMEngine(vllm_engine.VLLMEngine):
        def _prepare_engine_config(self, callback_ctx: Any) -> tuple[Any, Any, Any]:
            # Ray makes the config on a remote task that holds the GPU; this replica holds it
            # itself. The config is made for the uni executor from the start, since vLLM derives
            # other choices (async scheduling among them) from the executor.
            engine_config = self.llm_config.get_engine_config()
            _resolve_mirrored_model(engine_config)
            kwargs = engine_config.get_initialization_kwargs() | {"distributed_executor_backend": "uni"}
            args = AsyncEngineArgs(**vllm_engine._normalize_vllm_engine_kwargs(kwargs))
            config = args.create_engine_config(usage_context=UsageContext.OPENAI_API_SERVER)
            return args, vllm_engine.FrontendArgs(**engine_config.frontend_kwargs), config

    return InProcessVLLMEngine


def _resolve_mirrored_model(engine_config: Any) -> None:
    """A model mirrored from s3:// or gs:// is loaded from where Ray downloaded it (as Ray's own
    config step does)."""
    if not engine_config.mirror_config:
        return
    from ray.llm._internal.common.utils.download_utils import get_model_location_on_disk

    local = get_model_location_on_disk(engine_config.actual_hf_model_id)
    if local and local != engine_config.actual_hf_model_id:
        engine_config.hf_model_id = local
