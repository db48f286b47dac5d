"""JobSpec: one fine-tuning job, read from YAML and validated before anything is reserved."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from gpufleet.catalogue.config import Config
from gpufleet.catalogue.errors import fix
from gpufleet.catalogue.plans import PlanRequest
from gpufleet.catalogue.specfile import load_spec_file


class LoraSettings(Config):
    r: int = Field(default=16, ge=1, le=1024, description="Adapter rank.")
    alpha: int = Field(default=32, ge=1, description="LoRA alpha (scaling = alpha / r).")
    dropout: float = Field(default=0.0, ge=0, lt=1, description="Dropout on the adapter's input (peft lora_dropout).")
    target_modules: str | list[str] = Field(default="all-linear", description="peft target_modules.")


class PlanOverrides(Config):
    """Settings the catalogue's plan would choose; set them to pin them (on GPUs the plan then searches only
    layouts with these, checking their memory; on CPU workers they are the layout)."""

    workers: int | None = Field(default=None, ge=1, description="Data-parallel training workers.")
    zero_stage: int | None = Field(default=None, ge=0, le=3, description="DeepSpeed ZeRO stage (0-3).")
    offload_optimizer: bool | None = Field(default=None, description="ZeRO optimizer-state offload to host memory.")
    offload_params: bool | None = Field(default=None, description="ZeRO-3 parameter offload to host memory.")
    grad_ckpt: bool | None = Field(default=None, description="Gradient (activation) checkpointing.")
    micro_batch: int | None = Field(default=None, ge=1, description=(
        "Sequences per GPU per forward pass, at most; the rest of the global batch is gradient accumulation."))
    dtype: Literal["bfloat16", "float16", "float32"] | None = Field(
        default=None, description=("Default: bf16 where the GPU supports it, else fp16; float32 on CPU workers "
                                   "(GPU training is planned in half precision only)."))
    compile: bool | None = Field(default=None, description="torch.compile the model (default: on GPUs only).")
    objective: Literal["gpu-hours", "gpus"] = Field(default=PlanRequest.model_fields["objective"].default,
                                                   description=PlanRequest.model_fields["objective"].description)


class JobSpec(Config):
    """A LoRA or full fine-tune. Paths are relative to the spec file's folder."""

    name: str = Field(default="finetune", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description=(
        "The run's name: its folder under storage (<storage>/<name>/) and the job's name on the cluster."))
    model: str = Field(description=(
        "Model directory (config.json, weights, tokenizer), built-in name or Hugging Face repo id (downloaded "
        "once per node into its Hugging Face cache; export HF_TOKEN for a gated repo)."))
    dataset: str = Field(description=(
        "JSONL: chat `messages`, `prompt`/`completion`, or alpaca `instruction`/`input`/`output` records. A local "
        "file (uploaded with the job to a remote cluster) or s3:// / gs:// / file:// (read where the job runs)."))
    env: list[str] = Field(default_factory=list, description=(
        "Names of environment variables copied from the submitting machine into the job (HF_TOKEN always is, "
        "when set): their values travel in the job's runtime env, never in an uploaded file."))
    task: Literal["lora", "qlora", "full"] = Field(default="lora", description=(
        "lora: adapters on the 16-bit model; qlora: adapters on a bitsandbytes nf4 base (needs bitsandbytes); "
        "full: every weight."))
    lora: LoraSettings = Field(default=LoraSettings(), description="Adapter settings (lora and qlora).")
    learning_rate: float = Field(default=2e-4, gt=0, lt=1, description="Peak learning rate (AdamW).")
    schedule: Literal["cosine", "linear", "constant"] = Field(default="cosine", description=(
        "Learning-rate decay after warmup, to 0 at the last step (constant: none)."))
    warmup_steps: int = Field(default=0, ge=0, description="Optimizer steps of linear warmup from 0.")
    weight_decay: float = Field(default=0.0, ge=0, description="AdamW weight decay.")
    grad_clip: float = Field(default=1.0, gt=0, description="Gradient norm clipping threshold.")
    epochs: int | None = Field(default=None, ge=1, description="Passes over the dataset (or set max_steps).")
    max_steps: int | None = Field(default=None, ge=1, description=(
        "Optimizer steps to run (or set epochs; with both, max_steps decides)."))
    global_batch: int = Field(default=8, ge=1, description="Sequences per optimizer step, all workers.")
    seq_len: int = Field(default=512, ge=8, description="Tokens per packed training sequence.")
    output_dir: str = Field(default="outputs", description="Where checkpoints, logs and the result go.")
    storage: str | None = Field(default=None, description=(
        "Shared storage for checkpoints and results, under <storage>/<name>/: a path every node mounts, or "
        "s3://bucket/prefix, gs://bucket/prefix or file:///path (Ray Train's storage_path). Needed when the workers "
        "span nodes, and on a cluster whose head does not share the submitting machine's disk."))
    publish: str | None = Field(default=None, description=(
        "LoRA and QLoRA: when the run finishes, publish the adapter as <publish>/<name> (a serve spec's "
        "adapters_dir: a path or storage URI). Replicas serving that folder load a re-published adapter in "
        "place on its next request, without a restart."))
    checkpoint_every: int = Field(default=50, ge=1, description="Optimizer steps between checkpoints.")
    final_checkpoint: bool = Field(default=True, description=(
        "Also checkpoint the last step (resumable state: optimizer included; the exported model in "
        "output_dir/final is written either way)."))
    log_every: int = Field(default=10, ge=1, description="Optimizer steps between progress lines in the job's log.")
    max_failures: int = Field(default=2, ge=0, description="Worker failures to recover from by resuming.")
    gpu: str | None = Field(default=None, description="GPU type to run on; omit for CPU workers.")
    seed: int = Field(default=0, description="Random seed (data order, dropout, adapter initialisation).")
    stop_on_zero_loss_steps: int = Field(default=20, ge=1, description="Stop if the loss is exactly 0 this long.")
    plan: PlanOverrides = Field(default=PlanOverrides(), description=(
        "Layout pins: settings the plan would choose, fixed here (and checked against memory)."))

    @model_validator(mode="after")
    def _check(self) -> JobSpec:
        if self.epochs is None and self.max_steps is None:
            raise ValueError(fix("neither epochs nor max_steps is set", "set one, e.g. max_steps: 100"))
        if self.publish and self.task == "full":
            raise ValueError(fix("publish: is for LoRA / QLoRA adapters, and a full fine-tune writes a whole model",
                                 "serve the full model from <output_dir or storage>/<name>/final, or drop publish"))
        return self

    @property
    def use_gpu(self) -> bool:
        return self.gpu is not None


def load_job_spec(path: str | Path) -> tuple[JobSpec, Path]:
    """Parse and validate a job spec file; return it with its folder (for relative paths)."""
    return load_spec_file(path, JobSpec, "examples/lora-tiny.yaml")
