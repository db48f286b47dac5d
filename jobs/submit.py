"""Submit a fine-tune to a cluster through Ray's Job Submission SDK and follow it; or print it as a KubeRay RayJob.

``gpufleet train SPEC`` is ``ray job submit`` of ``python -m gpufleet.jobs.finetune spec.yaml`` with the spec
checked here first, a working directory holding only what the job needs (``gpufleet.jobs.upload``), the
head's auth applied, and a progress bar fed by the job's log.
"""

from __future__ import annotations

import asyncio
import re
import tempfile
from pathlib import Path
from typing import Any

from gpufleet.catalogue.errors import GpufleetError, fix
from gpufleet.cluster.endpoint import Endpoint, wait_for_end
from gpufleet.cluster.kuberay import PodSecrets
from gpufleet.jobs.upload import StagedJob, stage_job

STEP_LINE = re.compile(r"step (\d+)/(\d+) loss ([0-9.eE+-]+|nan|inf)")


def submit(spec_path: str | Path, endpoint: Endpoint) -> tuple[Any, str, StagedJob]:
    """Validate locally, stage the working directory, submit; returns (client, submission_id, staged job).
    The working directory is uploaded during the submission and removed here afterwards."""
    client = endpoint.job_client()
    with tempfile.TemporaryDirectory(prefix="gpufleet-job-") as tmp:
        job = stage_job(spec_path, Path(tmp) / "job", endpoint.shares_disk)
        # jobs.finetune's own ray.init adds TRAIN_ENV: Ray refuses a key set by both it and the job
        sid = client.submit_job(entrypoint=job.entrypoint, runtime_env=job.runtime_env(),
                                metadata={"gpufleet": "train", "name": job.spec.name,
                                          "workers": str(job.layout.workers)})
    return client, sid, job


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
    return wait_for_end(client, sid, 30)



CONFIGMAP_LIMIT = 900 * 2**10  # Kubernetes caps a ConfigMap at 1 MiB, metadata included
POD_OUTPUT_DIR = "/home/ray/gpufleet-outputs"  # pod-local and writable; results are copied to storage:


def kuberay_job(spec_path: str | Path, image: str, secrets: PodSecrets) -> list[dict[str, Any]]:
    """A ConfigMap with the job's spec (and its local dataset) and a KubeRay RayJob running it on a cluster
    whose one worker group is the plan's placement, in the gpufleet node image. Nothing in them names a
    path of this machine: the model comes by built-in name or repo id, outputs go to ``storage:``."""
    from gpufleet.catalogue.plans import DEFAULT_GPUS_PER_NODE
    from gpufleet.cluster.kuberay import JobFiles, ray_job, worker_group
    from gpufleet.jobs.upload import SPEC_FILE

    with tempfile.TemporaryDirectory(prefix="gpufleet-job-") as tmp:
        job = stage_job(spec_path, Path(tmp), shares_disk=False, output_dir=POD_OUTPUT_DIR)
        if (Path(tmp) / "model").exists():
            raise GpufleetError(fix(f"model: {job.spec.model} is a directory on this machine, which a KubeRay "
                                    "manifest cannot carry", "use a built-in name or a Hugging Face repo id"))
        files = sorted(f for f in Path(tmp).rglob("*") if f.is_file())
        size = sum(f.stat().st_size for f in files)
        if size > CONFIGMAP_LIMIT:
            raise GpufleetError(fix(f"the job's spec and dataset hold {size / 2**10:.0f} KiB, more than a ConfigMap "
                                    f"carries ({CONFIGMAP_LIMIT // 2**10} KiB)",
                                    "put the dataset in a bucket: dataset: s3://bucket/data.jsonl"))
        keys = {f.relative_to(tmp).as_posix().replace("/", "--"): f for f in files}
        job_files = JobFiles(data={k: f.read_text() for k, f in keys.items()},
                             paths={k: f.relative_to(tmp).as_posix() for k, f in keys.items()})
    group = worker_group(job.spec.name, job.layout.placement, job.spec.gpu or "CPU", DEFAULT_GPUS_PER_NODE, image)
    # Relative paths in the spec are resolved against its folder, the mount every pod has.
    entrypoint = f"python -m gpufleet.jobs.finetune {job_files.mount_path}/{SPEC_FILE}"
    return ray_job(job.spec.name, entrypoint, group, image, secrets, job_files)
