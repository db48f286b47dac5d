"""What a fine-tune takes to the cluster: its spec as content, the local files it names, nothing else.

Each submission gets a fresh working directory holding ``spec.yaml``. For a head that shares this
machine's disk (one `gpufleet up` started here) the spec names the local files by absolute path. For any
other head, the local dataset (and a local model directory, if small) are copied in, up to
``MAX_UPLOAD_BYTES``; models by built-in name or Hub repo id and datasets in buckets are fetched where the
job runs, and the results must go to ``storage:``. (Ray unpacks the working directory on each node under
its session folder; an uploaded model directory is read there, so it suits workers on nodes that share
Ray's temp-dir setting. Larger or multi-node inputs belong in a bucket or on the Hub.) Secrets never enter the directory: ``HF_TOKEN`` and the
variables the spec lists travel in the job's runtime env.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict

from gpufleet.catalogue.errors import SpecError, fix
from gpufleet.catalogue.sources import is_uri, resolve
from gpufleet.cluster.endpoint import forwarded_env
from gpufleet.jobs.finetune import UPLOADED_JOB_ENV, prepare
from gpufleet.jobs.layout import TrainLayout
from gpufleet.jobs.spec import JobSpec, load_job_spec

MAX_UPLOAD_BYTES = 100 * 2**20  # Ray refuses working dirs above 500 MiB; a job should not come close
SPEC_FILE = "spec.yaml"


class StagedJob(BaseModel):
    """A fine-tune ready to submit: its working directory, entrypoint and runtime env."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    spec: JobSpec
    layout: TrainLayout
    working_dir: Path
    env_vars: dict[str, str]

    @property
    def entrypoint(self) -> str:
        return f"python -m gpufleet.jobs.finetune {SPEC_FILE}"

    def runtime_env(self) -> dict[str, Any]:
        return {"working_dir": str(self.working_dir), "env_vars": self.env_vars}


def stage_job(spec_path: str | Path, into: Path, shares_disk: bool, output_dir: str | None = None) -> StagedJob:
    """Validate the spec (before anything is reserved) and write its job's working directory ``into``;
    ``output_dir`` replaces the spec's (where ``into`` will be mounted read-only)."""
    spec, layout, cfg = prepare(spec_path)
    _, base = load_job_spec(spec_path)
    into.mkdir(parents=True, exist_ok=True)
    data = spec.model_dump(exclude_defaults=True)
    if shares_disk:
        data.update(model=cfg["model"], dataset=cfg["dataset"], output_dir=cfg["output_dir"])
        if spec.storage and not is_uri(spec.storage):
            data["storage"] = str(resolve(base, spec.storage))
        if cfg["publish"]:
            data["publish"] = cfg["publish"]
    else:
        data.update(_uploaded_files(spec, base, cfg, into))
    if output_dir:
        data["output_dir"] = output_dir
    (into / SPEC_FILE).write_text(yaml.safe_dump(data, sort_keys=False))
    env = {**forwarded_env(spec.env), **({} if shares_disk else {UPLOADED_JOB_ENV: "1"})}
    return StagedJob(spec=spec, layout=layout, working_dir=into, env_vars=env)


def _uploaded_files(spec: JobSpec, base: Path, cfg: dict[str, Any], into: Path) -> dict[str, str]:
    """Copy the spec's local inputs into ``into``; the spec's fields that now name them there."""
    if not spec.storage:
        raise SpecError(fix("storage: is not set, and this cluster's head does not share this machine's disk: "
                            "the job's results would stay on a cluster node",
                            "set storage: to s3://bucket/prefix, gs://bucket/prefix or a path every node mounts"))
    if not is_uri(spec.storage) and not Path(spec.storage).expanduser().is_absolute():
        raise SpecError(fix(f"storage: {spec.storage} is relative to this machine's spec folder",
                            "use s3://, gs:// or an absolute path that every cluster node mounts"))
    if spec.publish and not is_uri(spec.publish) and not Path(spec.publish).expanduser().is_absolute():
        raise SpecError(fix(f"publish: {spec.publish} is relative to this machine's spec folder",
                            "use s3://, gs:// or an absolute path that the cluster's nodes and replicas mount"))
    fields: dict[str, str] = {}
    copies: list[tuple[Path, Path]] = []
    if not is_uri(cfg["dataset"]):
        src = Path(cfg["dataset"])
        copies.append((src, into / "data" / src.name))
        fields["dataset"] = f"data/{src.name}"
    if Path(cfg["model"]).is_dir():
        copies.append((Path(cfg["model"]), into / "model"))
        fields["model"] = "model"
    size = sum(_size(src) for src, _ in copies)
    if size > MAX_UPLOAD_BYTES:
        names = " and ".join(str(src) for src, _ in copies)
        raise SpecError(fix(f"{names} hold {size / 2**20:.0f} MiB, more than the {MAX_UPLOAD_BYTES // 2**20} MiB "
                            "a job uploads", "put the dataset in a bucket (dataset: s3://...) and the model on the "
                            "Hugging Face Hub (model: org/name), or in storage the nodes mount"))
    for src, dst in copies:
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst)
        else:
            shutil.copy2(src, dst)
    return fields


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size
