"""What a fine-tune takes to a cluster: the spec as content and only the files it names; secrets only in the
runtime env; a head that shares this disk gets paths, any other head gets copies (or is told what to fix)."""

from __future__ import annotations

import pytest
import yaml

from gpufleet.catalogue.errors import GpufleetError, SpecError
from gpufleet.cluster.endpoint import Endpoint, resolve_endpoint
from gpufleet.jobs import upload
from gpufleet.jobs.finetune import UPLOADED_JOB_ENV
from gpufleet.jobs.upload import stage_job
from tests.conftest import write_spec


@pytest.fixture
def user_folder(tmp_path, greeting_data):
    """A user's project folder: the spec, its data, and things that have nothing to do with the job."""
    folder = tmp_path / "project"
    (folder / "notes").mkdir(parents=True)
    (folder / "notes" / "secrets.txt").write_text("do not upload")
    (folder / "data.jsonl").write_text(greeting_data.read_text())
    return folder


def remote_spec(folder, model, **over):
    return write_spec(folder / "job.yaml", **{"name": "t", "model": str(model), "dataset": "data.jsonl",
                                              "max_steps": 2, "seq_len": 64, "storage": "s3://bucket/runs", **over})


def files_in(folder):
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def test_a_remote_job_carries_its_spec_and_the_files_it_names_and_nothing_else(user_folder, tiny_model, tmp_path,
                                                                              monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_secret_value")
    monkeypatch.setenv("WANDB_API_KEY", "wandb_secret")
    job = stage_job(remote_spec(user_folder, tiny_model, env=["WANDB_API_KEY"]), tmp_path / "wd", shares_disk=False)
    carried = files_in(job.working_dir)
    assert "spec.yaml" in carried and "data/data.jsonl" in carried and "model/config.json" in carried
    assert not any(f.startswith("notes") or f == "job.yaml" for f in carried)
    spec = yaml.safe_load((job.working_dir / "spec.yaml").read_text())
    assert (spec["model"], spec["dataset"]) == ("model", "data/data.jsonl")
    assert str(user_folder) not in (job.working_dir / "spec.yaml").read_text()
    for f in job.working_dir.rglob("*"):
        if f.is_file():
            assert b"hf_secret_value" not in f.read_bytes() and b"wandb_secret" not in f.read_bytes()
    assert job.env_vars == {"HF_TOKEN": "hf_secret_value", "WANDB_API_KEY": "wandb_secret", UPLOADED_JOB_ENV: "1"}
    assert job.entrypoint == "python -m gpufleet.jobs.finetune spec.yaml"


def test_a_head_that_shares_this_disk_gets_absolute_paths_and_no_copies(user_folder, tiny_model, tmp_path):
    job = stage_job(remote_spec(user_folder, tiny_model, storage=None), tmp_path / "wd", shares_disk=True)
    assert files_in(job.working_dir) == ["spec.yaml"]
    spec = yaml.safe_load((job.working_dir / "spec.yaml").read_text())
    assert spec["dataset"] == str(user_folder / "data.jsonl") and spec["model"] == str(tiny_model)


def test_a_listed_variable_missing_here_is_named(user_folder, tiny_model, tmp_path, monkeypatch):
    monkeypatch.delenv("NOT_SET_ANYWHERE", raising=False)
    with pytest.raises(GpufleetError, match="env: NOT_SET_ANYWHERE not set in this environment"):
        stage_job(remote_spec(user_folder, tiny_model, env=["NOT_SET_ANYWHERE"]), tmp_path / "wd", shares_disk=False)


def test_files_above_the_upload_limit_are_refused_with_the_bucket_as_the_fix(user_folder, tiny_model, tmp_path,
                                                                            monkeypatch):
    monkeypatch.setattr(upload, "MAX_UPLOAD_BYTES", 1024)
    with pytest.raises(SpecError, match=r"more than the 0 MiB a job uploads\. To fix: put the dataset in a bucket"):
        stage_job(remote_spec(user_folder, tiny_model), tmp_path / "wd", shares_disk=False)


def test_a_remote_job_without_storage_or_with_a_relative_one_is_refused(user_folder, tiny_model, tmp_path):
    with pytest.raises(SpecError, match="storage: is not set"):
        stage_job(remote_spec(user_folder, tiny_model, storage=None), tmp_path / "a", shares_disk=False)
    with pytest.raises(SpecError, match="storage: runs is relative"):
        stage_job(remote_spec(user_folder, tiny_model, storage="runs"), tmp_path / "b", shares_disk=False)


def test_a_bucket_dataset_is_left_to_the_cluster(user_folder, tiny_model, tmp_path):
    job = stage_job(remote_spec(user_folder, tiny_model, dataset="s3://bucket/chat.jsonl"), tmp_path / "wd",
                    shares_disk=False)
    assert yaml.safe_load((job.working_dir / "spec.yaml").read_text())["dataset"] == "s3://bucket/chat.jsonl"
    assert not (job.working_dir / "data").exists()


def test_the_cluster_is_the_address_given_then_ray_address_then_the_recorded_head(tmp_path, monkeypatch):
    monkeypatch.setenv("GPUFLEET_HOME", str(tmp_path))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(GpufleetError, match="no cluster named"):
        resolve_endpoint()
    monkeypatch.setenv("RAY_ADDRESS", "head.example:8265")
    assert resolve_endpoint() == Endpoint(dashboard_url="http://head.example:8265")
    assert resolve_endpoint("https://other:443").dashboard_url == "https://other:443"
    with pytest.raises(GpufleetError, match="ray://h:10001 is a Ray client / GCS address"):
        resolve_endpoint("ray://h:10001")
