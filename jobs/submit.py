"""Submit a fine-tune to the cluster through Ray's Job Submission SDK and follow it.

``gpufleet train SPEC`` is ``ray job submit --working-dir . -- python -m gpufleet.jobs.finetune SPEC`` with
the spec checked locally first, the head's auth applied, and a progress bar fed by the job's log.
"""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path
from typing import Any

import yaml

from gpufleet.catalogue.errors import GpufleetError
from gpufleet.cluster.head import HeadState
from gpufleet.jobs.finetune import prepare
from gpufleet.jobs.layout import TrainLayout
from gpufleet.jobs.spec import JobSpec

STEP_LINE = re.compile(r"step (\d+)/(\d+) loss ([0-9.eE+-]+|nan|inf)")


def resolved_spec(spec_path: str | Path) -> tuple[Path, JobSpec, TrainLayout]:
    """Validate a spec and write a copy with absolute paths next to its outputs.

    A job runs in a copy of the working directory, where the spec's relative paths would point
    elsewhere and its outputs would vanish with the copy: resolve them where the user submits.
    """
    spec, layout, cfg = prepare(spec_path)  # bad specs fail here, before anything is reserved
    out = Path(cfg["output_dir"])
    out.mkdir(parents=True, exist_ok=True)
    data = spec.model_dump(exclude_defaults=True)
    data.update(model=cfg["model_dir"], dataset=cfg["dataset"], output_dir=str(out))
    target = out / "submitted-spec.yaml"
    target.write_text(yaml.safe_dump(data, sort_keys=False))
    return target, spec, layout


def submit(spec_path: str | Path, head: HeadState, working_dir: str | Path = ".") -> tuple[Any, str]:
    """Validate locally, then submit; returns (client, submission_id)."""
    from ray.job_submission import JobSubmissionClient

    resolved, spec, layout = resolved_spec(spec_path)
    client = JobSubmissionClient(head.dashboard_url, headers=head.auth_headers())
    wd = Path(working_dir).resolve()
    sid = client.submit_job(entrypoint=f"python -m gpufleet.jobs.finetune {resolved}",
                            # no env_vars: gpufleet.jobs.finetune's ray.init sets TRAIN_ENV, and Ray refuses
                            # the same key set by both the job and its driver
                            runtime_env={"working_dir": str(wd)},
                            metadata={"gpufleet": "train", "name": spec.name, "workers": str(layout.workers)})
    return client, sid


def follow(client: Any, sid: str, on_line=print, on_step=None, timeout_s: float = 24 * 3600) -> str:
    """Stream the job's log until it ends; call ``on_step(step, total, loss)`` for progress lines."""
    async def tail() -> None:
        async for chunk in client.tail_job_logs(sid):
            for line in chunk.splitlines():
                on_line(line)
                m = STEP_LINE.search(line)
                if m and on_step:
                    on_step(int(m.group(1)), int(m.group(2)), float(m.group(3)))

    try:
        asyncio.run(asyncio.wait_for(tail(), timeout_s))
    except TimeoutError:
        raise GpufleetError(f"job {sid} still running after {timeout_s:g}s") from None
    deadline = time.monotonic() + 30
    while (status := str(client.get_job_status(sid).value)) not in ("SUCCEEDED", "FAILED", "STOPPED"):
        if time.monotonic() > deadline:
            break
        time.sleep(0.5)
    return status


def kuberay_job(spec_path: str | Path, image: str) -> dict[str, Any]:
    """A KubeRay RayJob running this fine-tune: ``python -m gpufleet.jobs.finetune SPEC`` on a cluster whose one
    worker group is the plan's placement (GPUs per pod up to a node's worth)."""
    from gpufleet.catalogue.plans import DEFAULT_GPUS_PER_NODE
    from gpufleet.cluster.kuberay import ray_job, worker_group
    from gpufleet.jobs.finetune import prepare

    spec, layout, _ = prepare(spec_path)
    group = worker_group(spec.name, layout.placement, spec.gpu or "CPU", DEFAULT_GPUS_PER_NODE, image)
    return ray_job(spec.name, f"python -m gpufleet.jobs.finetune {spec_path}", group, image)
