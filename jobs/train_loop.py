"""The per-worker training function that Ray Train's TorchTrainer runs on every worker.

DeepSpeed owns the model, optimizer and ZeRO partitioning; Ray owns the workers and the
process group. Every rank writes its own ZeRO shard, RNG state and data position into the
checkpoint it reports, and Ray merges the ranks' files into one checkpoint directory (persisting
only rank 0's files is the classic mistake that makes ZeRO checkpoints unloadable). On restart
the run resumes at the exact optimizer step where the checkpoint was taken.
"""

from __future__ import annotations

import json
import math
import os
import random
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gpufleet.catalogue.flops import mfu
from gpufleet.catalogue.sources import is_uri
from gpufleet.jobs.data import IGNORE

if TYPE_CHECKING:
    from gpufleet.jobs.layout import TrainLayout
    from gpufleet.jobs.spec import JobSpec

CKPT_TAG = "ckpt"
STATE_FILE = "trainer_state.json"
NUMERICS_MARKER = "STOPPED_NUMERICS"


class NumericsError(RuntimeError):
    """The loss went non-finite or collapsed to exactly 0: stop instead of burning GPU hours."""


def steps_per_epoch(n_sequences: int, workers: int, micro_batch: int, grad_accum: int) -> int:
    per_rank = math.ceil(n_sequences / workers)  # DistributedSampler pads the last round
    return math.ceil(per_rank / micro_batch) // grad_accum


def lr_lambda(schedule: str, warmup: int, total: int):
    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        frac = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.5 * (1 + math.cos(math.pi * frac)) if schedule == "cosine" else 1.0 - frac
    return f


def _skip_cpu_shm_op() -> None:
    # DeepSpeed builds a shared-memory all-reduce op (~70 s of g++) for every CPU init_distributed;
    # gloo does the job without it.
    import deepspeed.comm  # noqa: F401

    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None


def _rng_state() -> dict[str, Any]:
    import numpy as np
    import torch

    s = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def _set_rng_state(s: dict[str, Any]) -> None:
    import numpy as np
    import torch

    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def build_model(spec: JobSpec, layout: TrainLayout, model_dir: Path, device: Any) -> Any:
    """The model a worker trains, as the plan lays it out: loaded (nf4 for QLoRA), checkpointed when
    the plan says so, LoRA adapters attached, in training mode."""
    import torch
    from transformers import AutoModelForCausalLM

    dtype = getattr(torch, layout.dtype)
    ckpt_kwargs = {"use_reentrant": False}
    if spec.task == "qlora":  # the QLoRA recipe: nf4 base, peft casts the rest to fp32, checkpointing
        from peft import prepare_model_for_kbit_training
        from transformers import BitsAndBytesConfig

        nf4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="sdpa",
                                                     quantization_config=nf4, device_map={"": device})
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=layout.grad_ckpt,
                                                gradient_checkpointing_kwargs=ckpt_kwargs)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="sdpa")
        if layout.grad_ckpt:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=ckpt_kwargs)
    if spec.task in ("lora", "qlora"):
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=spec.lora.r, lora_alpha=spec.lora.alpha,
                                                 lora_dropout=spec.lora.dropout,
                                                 target_modules=spec.lora.target_modules, task_type="CAUSAL_LM"))
    # from_pretrained returns the model in eval mode, where transformers skips gradient checkpointing
    # (it checkpoints only while training) and builds a KV cache in every forward.
    model.train()
    model.config.use_cache = False
    return model


def train_func(cfg: dict[str, Any]) -> None:
    """Ray Train entry point. ``cfg``: spec (dict), layout (dict), deepspeed (dict), paths (str)."""
    import deepspeed
    import ray.train
    import torch
    import torch.distributed as dist
    from transformers import AutoTokenizer

    from gpufleet.jobs.data import build_dataset
    from gpufleet.jobs.hub import local_model_dir
    from gpufleet.jobs.layout import TrainLayout
    from gpufleet.jobs.spec import JobSpec

    spec, layout = JobSpec(**cfg["spec"]), TrainLayout(**cfg["layout"])
    model_dir, dataset_path, out_dir = local_model_dir(cfg["model"]), cfg["dataset"], Path(cfg["output_dir"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    (out_dir / "pids").mkdir(parents=True, exist_ok=True)
    (out_dir / "pids" / f"rank{rank}.pid").write_text(str(os.getpid()))

    if not layout.use_gpu:
        _skip_cpu_shm_op()
    deepspeed.init_distributed(dist_backend="nccl" if layout.use_gpu else "gloo")
    device = torch.device("cuda", torch.cuda.current_device()) if layout.use_gpu else torch.device("cpu")
    random.seed(spec.seed)
    torch.manual_seed(spec.seed + rank)

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = build_model(spec, layout, model_dir, device)
    trainable = [p for p in model.parameters() if p.requires_grad]

    data = build_dataset(cfg.get("conversations") or dataset_path, tokenizer, spec.seq_len)
    per_epoch = steps_per_epoch(len(data), world, layout.micro_batch, layout.grad_accum)
    if per_epoch == 0:
        raise ValueError(f"the dataset packs into {len(data)} sequences of {spec.seq_len} tokens, fewer than one "
                         f"global batch ({layout.global_batch}). To fix: lower global_batch or seq_len, or add data")
    total = spec.max_steps or spec.epochs * per_epoch
    ds_config = cfg["deepspeed"]
    optimizer = None
    if "optimizer" not in ds_config:  # offload configs name DeepSpeed's CPU Adam there instead
        optimizer = torch.optim.AdamW(trainable, lr=spec.learning_rate, weight_decay=spec.weight_decay,
                                      fused=layout.use_gpu)
    # A callable: DeepSpeed builds the schedule on whichever optimizer it ends up with (torch's AdamW
    # or, under optimizer offload, its CPU Adam), steps it in engine.step() and checkpoints it.
    schedule = lr_lambda(spec.schedule, spec.warmup_steps, total)
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, model_parameters=trainable, optimizer=optimizer, config=ds_config,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule))
    if layout.compile:
        engine.compile()

    start = 0
    ckpt = ray.train.get_checkpoint()
    if ckpt:
        with ckpt.as_directory() as d:
            engine.load_checkpoint(d, tag=CKPT_TAG)
            start = json.loads((Path(d) / STATE_FILE).read_text())["step"]
            _set_rng_state(torch.load(Path(d) / f"rng_rank{rank}.pt", weights_only=False))

    from torch.utils.data.distributed import DistributedSampler

    sampler = DistributedSampler(range(len(data)), num_replicas=world, rank=rank, shuffle=True, seed=spec.seed)

    def micro_batches(step: int) -> list[list[int]]:
        """The micro-batches of global optimizer step ``step`` for this rank (deterministic)."""
        epoch, within = divmod(step, per_epoch)
        sampler.set_epoch(epoch)
        idx = list(sampler)
        m, a = layout.micro_batch, layout.grad_accum
        return [idx[i:i + m] for i in range((within * a) * m, (within * a + a) * m, m)]

    def collate(ids: list[int]) -> dict[str, torch.Tensor]:
        return {k: torch.tensor([data[i][k] for i in ids], device=device) for k in data[0]}

    metrics_file = out_dir / "metrics.jsonl"
    zero_run = 0
    peak_tflops = cfg.get("peak_tflops", 0.0)
    flops_per_token = cfg.get("flops_per_token", 0.0)  # model FLOPs (gpufleet.catalogue.flops), no recompute
    for step in range(start, total):
        t0 = time.perf_counter()
        losses, tokens, supervised = [], 0, 0
        for mb in micro_batches(step):
            batch = collate(mb)
            loss = engine(**batch).loss
            engine.backward(loss)
            engine.step()
            losses.append(loss.detach().float())
            tokens += int(batch["attention_mask"].sum())
            supervised += int((batch["labels"] != IGNORE).sum())
        mean = torch.stack(losses).mean()
        stats = torch.tensor([float(mean), float(tokens), float(supervised)], dtype=torch.float64,
                             device=device)  # NCCL: on the GPU
        dist.all_reduce(stats)
        loss_v, tokens_all = float(stats[0]) / world, float(stats[1])
        masked = stats[2] == 0  # no label to learn from: the mean over none is 0/0, not a numeric fault
        if masked:
            loss_v = 0.0
        dt = time.perf_counter() - t0
        zero_run = zero_run + 1 if loss_v == 0.0 else 0
        stop = stop_reason(loss_v, step, layout.dtype, spec.task, spec.stop_on_zero_loss_steps, zero_run, masked)
        if stop:
            # Every rank saw the same all-reduced loss, so all stop here, cleanly: raising instead would be a
            # worker failure, which Ray Train retries (max_failures times) only to reach the same step.
            if rank == 0:
                (out_dir / NUMERICS_MARKER).write_text(stop)
                write_stop_note(cfg, stop)
            return
        gn = engine.get_global_grad_norm()
        m = {"step": step + 1, "total_steps": total, "loss": loss_v,
             "grad_norm": float(gn) if gn is not None else None, "lr": scheduler.get_last_lr()[0],
             "tokens_per_s": tokens_all / dt, "step_time_s": dt, "resumed_from": start, "epoch": step // per_epoch}
        m["host_peak_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB -> GiB
        if layout.use_gpu:
            m["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
            if peak_tflops and flops_per_token:
                m["mfu"] = mfu(tokens_all / world / dt, flops_per_token, peak_tflops)
        if rank == 0:
            with metrics_file.open("a") as f:
                f.write(json.dumps(m) + "\n")
            if (step + 1) % spec.log_every == 0 or step + 1 == total:
                print(f"step {step + 1}/{total} loss {loss_v:.4f} lr {m['lr']:.2e} "
                      f"{m['tokens_per_s']:.0f} tok/s", flush=True)
        done = step + 1 == total
        if (step + 1) % spec.checkpoint_every == 0 or (done and spec.final_checkpoint):
            with tempfile.TemporaryDirectory(prefix="gf-ckpt-") as d:
                engine.save_checkpoint(d, tag=CKPT_TAG)
                torch.save(_rng_state(), Path(d) / f"rng_rank{rank}.pt")
                if rank == 0:
                    (Path(d) / STATE_FILE).write_text(json.dumps({"step": step + 1, "total": total}))
                ray.train.report(m, checkpoint=ray.train.Checkpoint.from_directory(d),
                                 checkpoint_dir_name=f"step_{step + 1:06d}")
        elif (step + 1) % spec.log_every == 0:
            ray.train.report(m)
    _export(engine, model, tokenizer, spec.task, layout.zero_stage, rank, out_dir / "final")
    if rank == 0 and cfg.get("upload_to"):
        _upload(out_dir, cfg["upload_to"])


def _upload(out_dir: Path, uri: str) -> None:
    """Copy the result and the metrics to a bucket (s3://, gs://; file:// too) through pyarrow's filesystems."""
    import pyarrow.fs as pafs

    fs, root = pafs.FileSystem.from_uri(uri)
    fs.create_dir(f"{root}/final", recursive=True)  # object stores have no directories; file systems need them
    pafs.copy_files(str(out_dir / "final"), f"{root}/final", destination_filesystem=fs)
    pafs.copy_files(str(out_dir / "metrics.jsonl"), f"{root}/metrics.jsonl", destination_filesystem=fs)


def _stop_note(cfg: dict[str, Any]) -> tuple[Any, str]:
    """Where a stopped run leaves its reason: beside Ray Train's run state in its storage, which the driver
    reads (a metric would not do: Ray Train's result carries the last checkpoint's metrics only)."""
    from gpufleet.cluster.adapter_store import storage

    root = cfg["storage_path"] if is_uri(cfg["storage_path"]) else str(Path(cfg["storage_path"]).absolute())
    fs, path = storage(root)
    return fs, f"{path}/{cfg['spec']['name']}/{NUMERICS_MARKER}"


def write_stop_note(cfg: dict[str, Any], reason: str) -> None:
    fs, note = _stop_note(cfg)
    fs.create_dir(note.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(note) as f:
        f.write(reason.encode())


def read_stop_note(cfg: dict[str, Any]) -> str | None:
    """The reason this run stopped, or None where it was not stopped."""
    import pyarrow.fs as pafs

    fs, note = _stop_note(cfg)
    if fs.get_file_info(note).type == pafs.FileType.NotFound:
        return None
    with fs.open_input_stream(note) as f:
        return f.read().decode()


def clear_stop_note(cfg: dict[str, Any]) -> None:
    """Forget an earlier run's stop (a resubmitted job after its fix is a new run)."""
    import pyarrow.fs as pafs

    fs, note = _stop_note(cfg)
    if fs.get_file_info(note).type != pafs.FileType.NotFound:
        fs.delete_file(note)


def stop_reason(loss: float, step: int, dtype: str, task: str, zero_limit: int, zero_run: int,
                masked: bool = False) -> str | None:
    """Why the run must stop, with the likely cause: at once on a non-finite loss, and after ``zero_limit``
    steps of an exactly-zero loss (None: go on). The driver raises it as a ``NumericsError``."""
    msg = None
    if masked and zero_run >= zero_limit:
        msg = (f"no labelled token in {zero_run} steps (step {step + 1}): every label is masked. Likely cause: "
               "prompts longer than seq_len (the assistant's answer is cut off), or records without an answer")
    elif not math.isfinite(loss):
        cause = ("fp16 overflow: train in bf16 on a GPU with compute capability >= 8.0, or lower the learning rate"
                 if dtype == "float16" else "the learning rate is too high or the data holds invalid tokens")
        msg = f"loss is {loss} at step {step + 1}. Likely cause: {cause}"
    elif zero_run >= zero_limit:
        cause = ("LoRA adapter weights not in fp32 (their updates underflow) or every label is masked"
                 if task in ("lora", "qlora") else "every label is masked, or the model memorised a tiny dataset")
        msg = f"loss has been exactly 0 for {zero_run} steps (step {step + 1}). Likely cause: {cause}"
    return msg


def _export(engine: Any, model: Any, tokenizer: Any, task: str, zero_stage: int, rank: int, out: Path) -> None:
    """Rank 0 writes a servable directory: the LoRA adapters only (peft), or the full model in
    Hugging Face format, plus the tokenizer.

    Under ZeRO-3 no rank ever holds the whole model at once on its GPU: a LoRA export gathers only
    the adapters; a full export is consolidated one layer at a time onto rank 0's host memory
    (DeepSpeed's ``_zero3_consolidated_16bit_state_dict``, the path accelerate's ``get_state_dict``
    takes), the other ranks only lending their shards.
    """
    import deepspeed
    import torch.distributed as dist

    if task == "full" and zero_stage == 3:
        state = engine._zero3_consolidated_16bit_state_dict()  # collective: every rank takes part
        if rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            model.save_pretrained(out, state_dict=state, safe_serialization=True)
            tokenizer.save_pretrained(out)
    else:
        adapters = [p for p in model.parameters() if p.requires_grad] if task in ("lora", "qlora") else []
        with deepspeed.zero.GatheredParameters(adapters, modifier_rank=None, enabled=zero_stage == 3 and bool(adapters)):
            if rank == 0:
                out.mkdir(parents=True, exist_ok=True)
                model.save_pretrained(out, safe_serialization=True)
                tokenizer.save_pretrained(out)
    dist.barrier()
