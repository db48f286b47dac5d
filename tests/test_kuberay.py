"""KubeRay manifests: a RayService for a serve app and a RayJob for a fine-tune, valid against KubeRay's own
CRD schemas (tests/kuberay/, see SOURCE there), their worker groups sized from the plans."""

import gzip
import json
from pathlib import Path

import jsonschema
import pytest
import yaml
from click.testing import CliRunner

from gpufleet.catalogue.model import load_model
from gpufleet.catalogue.planner import plan
from gpufleet.cli import main
from tests.conftest import write_spec

CRDS = Path(__file__).parent / "kuberay"


def crd_schema(kind: str) -> dict:
    crd = yaml.safe_load(gzip.decompress((CRDS / f"ray.io_{kind}.yaml.gz").read_bytes()))
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    return version["schema"]["openAPIV3Schema"]


def unknown_fields(obj, schema: dict, path: str = "") -> list[str]:
    """Keys the schema does not declare: Kubernetes prunes them silently, so a typo would vanish."""
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    out = []
    if isinstance(obj, dict) and "properties" in schema:
        for k, v in obj.items():
            if k in schema["properties"]:
                out += unknown_fields(v, schema["properties"][k], f"{path}.{k}")
            elif not schema.get("additionalProperties"):
                out.append(f"{path}.{k}")
    elif isinstance(obj, list) and "items" in schema:
        for i, v in enumerate(obj):
            out += unknown_fields(v, schema["items"], f"{path}[{i}]")
    return out


def assert_valid(manifest: dict, kind: str) -> None:
    schema = crd_schema(kind)
    jsonschema.validate(manifest, schema)
    assert unknown_fields(manifest, schema) == []


def emitted(*args: str) -> dict:
    r = CliRunner().invoke(main, list(args))
    assert r.exit_code == 0, r.output
    return yaml.safe_load(r.output[r.output.index("apiVersion"):] if "apiVersion" in r.output else r.output)


def test_rayservice_is_valid_and_its_worker_group_is_the_plans_replica():
    manifest = emitted("serve", "llama-3.1-70b", "--gpu", "H100", "--emit-config", "--format", "kuberay")
    assert_valid(manifest, "rayservices")
    assert (manifest["apiVersion"], manifest["kind"]) == ("ray.io/v1", "RayService")
    p = plan(load_model("llama-3.1-70b"), "serve", "H100")
    (group,) = manifest["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    pod = group["template"]["spec"]
    assert group["rayStartParams"]["num-gpus"] == str(p.gpus) == "2"
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == p.gpus
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}


def test_rayservice_carries_the_same_serve_app_as_format_serve():
    service = emitted("serve", "llama-3.1-8b", "--gpu", "L4", "--emit-config", "--format", "kuberay")
    serve = emitted("serve", "llama-3.1-8b", "--gpu", "L4", "--emit-config")
    inner = yaml.safe_load(service["spec"]["serveConfigV2"])
    assert inner["applications"] == serve["applications"] and inner["http_options"]["host"] == "0.0.0.0"
    assert serve["http_options"]["host"] == "127.0.0.1"  # --format serve stays today's config


def test_rayjob_for_a_gpu_finetune_is_valid_and_sized_from_the_layout(tmp_path, tiny_model, greeting_data):
    spec = write_spec(tmp_path / "job.yaml", name="tiny-lora", model=str(tiny_model), dataset=str(greeting_data),
                      task="lora", max_steps=10, global_batch=8, seq_len=64, gpu="A10G", output_dir=str(tmp_path / "out"),
                      plan={"workers": 4})
    manifest = emitted("train", str(spec), "--emit-config", "--format", "kuberay")
    assert_valid(manifest, "rayjobs")
    job = manifest["spec"]
    assert job["entrypoint"] == f"python -m gpufleet.jobs.finetune {spec}" and job["shutdownAfterJobFinishes"]
    (group,) = job["rayClusterSpec"]["workerGroupSpecs"]
    assert group["rayStartParams"]["num-gpus"] == "4" and group["replicas"] == 1
    assert group["template"]["spec"]["nodeSelector"]["nvidia.com/gpu.product"] == "NVIDIA-A10G"


def test_the_schema_check_catches_a_misspelled_field():
    manifest = emitted("serve", "llama-3.1-8b", "--gpu", "L4", "--emit-config", "--format", "kuberay")
    manifest["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["minReplica"] = 1
    assert unknown_fields(manifest, crd_schema("rayservices")) == [
        ".spec.rayClusterConfig.workerGroupSpecs[0].minReplica"]
    manifest["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["rayStartParams"]["num-gpus"] = 2
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(json.loads(json.dumps(manifest)), crd_schema("rayservices"))


def test_a_target_load_sets_the_replicas_the_app_and_the_worker_group_start_with():
    args = ("serve", "llama-3.1-70b", "--gpu", "H100", "--target-output-tokens-per-s", "20000", "--emit-config")
    (llm,) = emitted(*args)["applications"][0]["args"]["llm_configs"]
    scaling = llm["deployment_config"]["autoscaling_config"]
    assert llm["engine_kwargs"]["tensor_parallel_size"] == 4 and scaling["min_replicas"] == scaling["max_replicas"] == 3
    (group,) = emitted(*args, "--format", "kuberay")["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    assert group["minReplicas"] == group["replicas"] == 3 and group["rayStartParams"]["num-gpus"] == "4"
