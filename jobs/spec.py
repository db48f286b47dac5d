"""JobSpec: one fine-tuning job, read from YAML and validated before anything is reserved."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from cluster.errors import SpecError, fix
from cluster.specfile import load_spec_file


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LoraSettings(_Spec):
    r: int = Field(default=16, ge=1, le=1024, description="Adapter rank.")
    alpha: int = Field(default=32, ge=1, description="LoRA alpha (scaling = alpha / r).")
    dropout: float = Field(default=0.0, ge=0, lt=1)
    target_modules: str | list[str] = Field(default="all-linear", description="peft target_modules.")


class PlanOverrides(_Spec):
    """Settings the catalogue's plan would choose; set them to override it."""

    workers: int | None = Field(default=None, ge=1, description="Data-parallel training workers.")
    zero_stage: int | None = Field(default=None, ge=0, le=3)
    offload_optimizer: bool | None = None
    grad_ckpt: bool | None = None
    micro_batch: int | None = Field(default=None, ge=1)
    dtype: Literal["bfloat16", "float16", "float32"] | None = Field(
        default=None, description="float32 for CPU runs; default: bf16 where the GPU supports it, else fp16.")
    compile: bool | None = Field(default=None, description="torch.compile the model (default: on GPUs only).")


class JobSpec(_Spec):
    """A LoRA or full fine-tune. Paths are relative to the spec file's folder."""

    name: str = Field(default="finetune", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    model: str = Field(description="Model directory (config.json, weights, tokenizer).")
    dataset: str = Field(description="JSONL: chat `messages`, `prompt`/`completion`, or alpaca "
                                     "`instruction`/`input`/`output` records.")
    task: Literal["lora", "full"] = "lora"
    lora: LoraSettings = LoraSettings()
    learning_rate: float = Field(default=2e-4, gt=0, lt=1)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = Field(default=0, ge=0)
    weight_decay: float = Field(default=0.0, ge=0)
    grad_clip: float = Field(default=1.0, gt=0)
    epochs: int | None = Field(default=None, ge=1)
    max_steps: int | None = Field(default=None, ge=1)
    global_batch: int = Field(default=8, ge=1, description="Sequences per optimizer step, all workers.")
    seq_len: int = Field(default=512, ge=8, description="Tokens per packed training sequence.")
    output_dir: str = Field(default="outputs", description="Where checkpoints, logs and the result go.")
    checkpoint_every: int = Field(default=50, ge=1, description="Optimizer steps between checkpoints.")
    log_every: int = Field(default=10, ge=1)
    max_failures: int = Field(default=2, ge=0, description="Worker failures to recover from by resuming.")
    gpu: str | None = Field(default=None, description="GPU type to run on; omit for CPU workers.")
    seed: int = 0
    stop_on_zero_loss_steps: int = Field(default=20, ge=1, description="Stop if the loss is exactly 0 this long.")
    plan: PlanOverrides = PlanOverrides()

    @model_validator(mode="after")
    def _check(self) -> JobSpec:
        if self.epochs is None and self.max_steps is None:
            raise ValueError(fix("neither epochs nor max_steps is set", "set one, e.g. max_steps: 100"))
        return self

    @property
    def use_gpu(self) -> bool:
        return self.gpu is not None


def load_job_spec(path: str | Path) -> tuple[JobSpec, Path]:
    """Parse and validate a job spec file; return it with its folder (for relative paths)."""
    return load_spec_file(path, JobSpec, "examples/lora-tiny.yaml")


def resolve(base: Path, value: str) -> Path:
    q = Path(value).expanduser()
    return q if q.is_absolute() else (base / q).resolve()


def check_model_dir(model_dir: Path, seq_len: int | None = None) -> dict[str, Any]:
    """The model's config, after checking the directory is loadable (and, given ``seq_len``, that
    the model holds that many tokens: a job's ``seq_len``; serving checks its own ``context``)."""
    cfg_file = model_dir / "config.json"
    if not cfg_file.is_file():
        raise SpecError(fix(f"model: {model_dir} has no config.json",
                            "point model at a Hugging Face model directory (python -m jobs.tiny_model DIR makes one)"))
    if not any((model_dir / f).exists() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        raise SpecError(fix(f"model: {model_dir} has no tokenizer", "save the tokenizer into the model directory"))
    cfg = json.loads(cfg_file.read_text())
    max_pos = cfg.get("max_position_embeddings")
    if max_pos and seq_len is not None and seq_len > max_pos:
        raise SpecError(fix(f"seq_len={seq_len} exceeds the model's max_position_embeddings={max_pos}",
                            f"set seq_len <= {max_pos}"))
    return cfg
