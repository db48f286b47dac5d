"""Run a fine-tuning job: ``python -m gpufleet.jobs.finetune SPEC.yaml`` (also the `ray job submit` entrypoint).

Everything that can be checked is checked before a worker starts: the spec, the model directory,
the dataset, the layout, and whether the cluster can ever hold the workers. Then Ray Train's
TorchTrainer runs ``gpufleet.jobs.train_loop.train_func`` on every worker, resuming from the latest
checkpoint after a worker failure (up to ``max_failures``). Checkpoints, metrics and logs stay in
``output_dir`` whatever happens.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from gpufleet.catalogue.errors import GpufleetError, SpecError, fix
from gpufleet.catalogue.flops import train_flops_per_token
from gpufleet.catalogue.gpus import get_gpu
from gpufleet.catalogue.model import spec_from_config
from gpufleet.catalogue.placement import Placement
from gpufleet.catalogue.sources import REMOTE_SCHEMES, is_uri, model_source, resolve
from gpufleet.jobs.data import load_conversations
from gpufleet.jobs.layout import TrainLayout, deepspeed_config, resolve_layout
from gpufleet.jobs.spec import JobSpec, load_job_spec

# Ray Train's report() waits for the controller's poll (2 s by default) on every call.
TRAIN_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1"}
# Set in the runtime env of a job whose files travelled with it (gpufleet.jobs.upload).
UPLOADED_JOB_ENV = "GPUFLEET_UPLOADED_JOB"


def prepare(spec_path: str | Path) -> tuple[JobSpec, TrainLayout, dict[str, Any]]:
    """Validate everything that needs no cluster; return the spec, layout and worker config.

    A dataset named by URI is read where the job runs (``run`` checks it before any worker starts)."""
    spec, base = load_job_spec(spec_path)
    model, model_config = model_source(spec.model, base, "model")
    if model.startswith(REMOTE_SCHEMES):
        raise SpecError(fix(f"model: {spec.model} is a bucket URI, which only serving loads",
                            "train from a model directory, a built-in name or a Hugging Face repo id"))
    model_spec = spec_from_config(model_config, name=spec.model)
    dataset = spec.dataset if is_uri(spec.dataset) else str(resolve(base, spec.dataset))
    if not is_uri(dataset):
        load_conversations(dataset)  # format errors now, with line numbers, not inside a worker
    layout = resolve_layout(spec, model_spec)
    out = resolve(base, spec.output_dir)
    cfg: dict[str, Any] = {
        "spec": spec.model_dump(), "layout": layout.model_dump(), "deepspeed": deepspeed_config(layout, spec),
        "model": model, "dataset": dataset, "output_dir": str(out),
        "storage_path": str(out / "ray"), "upload_to": None,
        "publish": spec.publish if not spec.publish or is_uri(spec.publish) else str(resolve(base, spec.publish)),
    }
    if spec.storage and is_uri(spec.storage):  # a bucket: results are written locally, then uploaded
        cfg.update(storage_path=spec.storage, upload_to=f"{spec.storage.rstrip('/')}/{spec.name}")
    elif spec.storage:  # a shared mount: every rank writes there directly
        shared = resolve(base, spec.storage)
        cfg.update(storage_path=str(shared), output_dir=str(shared / spec.name))
    if spec.use_gpu:
        cfg["peak_tflops"] = get_gpu(spec.gpu).peak_tflops
        cfg["flops_per_token"] = train_flops_per_token(model_spec, spec.seq_len, spec.task)
    return spec, layout, cfg


def scaling_kwargs(placement: Placement) -> dict[str, Any]:
    """Ray Train's ScalingConfig arguments for a plan's placement: Ray Train reserves exactly
    ``placement.bundles`` (it adds the accelerator pin back from ``accelerator_type``)."""
    return dict(num_workers=len(placement.bundles), use_gpu=placement.use_gpu,
                resources_per_worker=placement.resources_per_worker, accelerator_type=placement.accelerator_type,
                placement_strategy=placement.strategy)


def run(spec_path: str | Path) -> dict[str, Any]:
    """Train; return a summary (final metrics, checkpoint and output paths)."""
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from gpufleet.cluster.placement import check_placeable, spans_nodes
    from gpufleet.jobs.train_loop import (
        NUMERICS_MARKER,
        NumericsError,
        clear_stop_note,
        read_stop_note,
        train_func,
    )

    spec, layout, cfg = prepare(spec_path)
    if is_uri(cfg["dataset"]):
        load_conversations(cfg["dataset"])  # read where the job runs: errors before any worker starts
    elif os.environ.get(UPLOADED_JOB_ENV):
        # The dataset came in the job's working directory, which Ray Train's workers do not run in:
        # they get its records instead (bounded by the upload limit).
        cfg["conversations"] = load_conversations(cfg["dataset"])
    if not ray.is_initialized():
        ray.init(runtime_env={"env_vars": TRAIN_ENV}, logging_level="ERROR")
    waiting = check_placeable(layout.placement)
    if not spec.storage and spans_nodes(layout.placement):
        raise GpufleetError(fix(
            f"the job's {layout.workers} workers cannot share one node, and output_dir {cfg['output_dir']} is "
            "node-local: checkpoints and the result would be scattered over the nodes",
            "set storage: to a path every node mounts, or to s3://bucket/prefix or gs://bucket/prefix"))
    if waiting:
        print(waiting, flush=True)
    out = Path(cfg["output_dir"])
    out.mkdir(parents=True, exist_ok=True)
    (out / NUMERICS_MARKER).unlink(missing_ok=True)  # an earlier run's stop (before its fix) is not this run's
    clear_stop_note(cfg)
    (out / "layout.json").write_text(json.dumps({"layout": layout.model_dump(), "deepspeed": cfg["deepspeed"]},
                                                indent=1))
    trainer = TorchTrainer(
        train_func, train_loop_config=cfg, scaling_config=ScalingConfig(**scaling_kwargs(layout.placement)),
        run_config=RunConfig(storage_path=cfg["storage_path"], name=spec.name,
                             failure_config=FailureConfig(max_failures=spec.max_failures)),
    )
    result = trainer.fit()
    stopped = read_stop_note(cfg)
    if stopped:
        raise NumericsError(stopped)
    final = f"{cfg['upload_to']}/final" if cfg["upload_to"] else str(out / "final")
    published = None
    if spec.publish:
        from gpufleet.cluster.adapter_store import publish_adapter

        published = {**publish_adapter(final, cfg["publish"], spec.name), "store": cfg["publish"]}
    return {"metrics": result.metrics, "checkpoint": result.checkpoint.path if result.checkpoint else None,
            "output": final, "layout": layout.model_dump(), "published": published}


def main(argv: list[str] | None = None) -> int:
    args = argv if argv is not None else sys.argv[1:]
    if len(args) != 1:
        print("usage: python -m gpufleet.jobs.finetune SPEC.yaml", file=sys.stderr)
        return 2
    os.environ.update({k: os.environ.get(k, v) for k, v in TRAIN_ENV.items()})
    try:
        summary = run(args[0])
    except GpufleetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # TrainingFailedError and friends: say why, and where the work is kept
        cause = e
        while cause.__cause__ is not None:
            cause = cause.__cause__
        print(f"error: training failed: {type(cause).__name__}: {cause}", file=sys.stderr)
        print("checkpoints, metrics.jsonl and logs are kept in the job's output_dir", file=sys.stderr)
        return 1
    m = summary["metrics"] or {}
    print(f"done: step {m.get('step')}/{m.get('total_steps')} loss {m.get('loss', float('nan')):.4f}; "
          f"result in {summary['output']}; checkpoint {summary['checkpoint']}")
    if p := summary["published"]:
        print(f"published: adapter {p['name']} version {p['version']} in {p['store']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
