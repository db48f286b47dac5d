"""KubeRay manifests: a RayService for a serve app and a RayJob for a fine-tune, valid against KubeRay's own
CRD schemas (tests/kuberay/, see SOURCE there), their worker groups sized from the plans."""

import gzip
import json
from importlib.metadata import version
from pathlib import Path

import jsonschema
import pytest
import yaml
from click.testing import CliRunner

from gpufleet.catalogue.model import load_model
from gpufleet.catalogue.planner import plan
from gpufleet.cli import main
from gpufleet.cluster.image import node_pins
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
    p = plan(load_model("llama-3.1-70b"), "serve", "H100")  # TP=4: the most output tokens per GPU
    (group,) = manifest["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    pod = group["template"]["spec"]
    assert group["rayStartParams"]["num-gpus"] == str(p.gpus) == "4"
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == p.gpus
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}


def test_rayservice_carries_the_same_serve_app_as_format_serve():
    service = emitted("serve", "llama-3.1-8b", "--gpu", "L4", "--emit-config", "--format", "kuberay")
    serve = emitted("serve", "llama-3.1-8b", "--gpu", "L4", "--emit-config")
    inner = yaml.safe_load(service["spec"]["serveConfigV2"])
    assert inner["applications"] == serve["applications"] and inner["http_options"]["host"] == "0.0.0.0"
    assert serve["http_options"]["host"] == "127.0.0.1"  # --format serve stays today's config


def emitted_all(*args: str) -> list[dict]:
    r = CliRunner().invoke(main, list(args))
    assert r.exit_code == 0, r.output
    return list(yaml.safe_load_all(r.output))


def gpu_lora_spec(tmp_path, data, **fields):
    return write_spec(tmp_path / "job.yaml", name="qwen-lora", model="qwen2.5-0.5b", dataset=str(data), task="lora",
                      max_steps=10, global_batch=8, seq_len=64, gpu="A10G", storage="s3://bucket/runs",
                      plan={"workers": 4}, **fields)


def test_rayjob_for_a_gpu_finetune_is_valid_and_sized_from_the_layout(tmp_path, greeting_data):
    config_map, manifest = emitted_all("train", str(gpu_lora_spec(tmp_path, greeting_data)), "--emit-config")
    assert_valid(manifest, "rayjobs")
    job = manifest["spec"]
    assert job["entrypoint"] == "python -m gpufleet.jobs.finetune /home/ray/gpufleet-job/spec.yaml"
    assert job["shutdownAfterJobFinishes"]
    (group,) = job["rayClusterSpec"]["workerGroupSpecs"]
    assert group["rayStartParams"]["num-gpus"] == "4" and group["replicas"] == 1
    assert group["template"]["spec"]["nodeSelector"]["nvidia.com/gpu.product"] == "NVIDIA-A10G"


def test_rayjob_carries_its_spec_and_dataset_and_names_no_path_of_the_submitting_machine(tmp_path, greeting_data):
    spec = gpu_lora_spec(tmp_path, greeting_data)
    docs = emitted_all("train", str(spec), "--emit-config")
    text = yaml.safe_dump_all(docs)
    assert str(tmp_path) not in text and str(greeting_data.parent) not in text
    config_map, job = docs
    assert config_map["kind"] == "ConfigMap"
    carried = yaml.safe_load(config_map["data"]["spec.yaml"])
    assert (carried["model"], carried["dataset"]) == ("qwen2.5-0.5b", "data/greetings.jsonl")
    assert config_map["data"]["data--greetings.jsonl"] == greeting_data.read_text()
    for group in (job["spec"]["rayClusterSpec"]["headGroupSpec"], *job["spec"]["rayClusterSpec"]["workerGroupSpecs"]):
        pod = group["template"]["spec"]
        assert pod["volumes"][0]["configMap"]["name"] == config_map["metadata"]["name"]
        (container,) = pod["containers"]
        assert container["volumeMounts"][0]["mountPath"] == "/home/ray/gpufleet-job"


def test_every_pod_runs_the_gpufleet_image_of_this_version_with_its_secrets_from_kubernetes(tmp_path, greeting_data):
    _, job = emitted_all("train", str(gpu_lora_spec(tmp_path, greeting_data)), "--emit-config",
                         "--hf-token-secret", "my-hf")
    service = emitted("serve", "llama-3.1-8b", "--gpu", "L4", "--emit-config", "--format", "kuberay")
    image = f"ghcr.io/gpufleet/gpufleet:{version('gpufleet')}"
    for cluster in (job["spec"]["rayClusterSpec"], service["spec"]["rayClusterConfig"]):
        assert cluster["rayVersion"] == node_pins()["ray"]
        for group in (cluster["headGroupSpec"], *cluster["workerGroupSpecs"]):
            (c,) = group["template"]["spec"]["containers"]
            assert c["image"] == image
            assert c["envFrom"] == [{"secretRef": {"name": "gpufleet-storage", "optional": True}}]
            (hf,) = c["env"]
            assert hf["valueFrom"]["secretKeyRef"]["name"] == ("my-hf" if cluster is job["spec"]["rayClusterSpec"]
                                                               else "hf-token")
    app = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"][0]
    assert app["import_path"] == "gpufleet.serve_apps.app:build_from_args"
    other = emitted("serve", "llama-3.1-8b", "--gpu", "L4", "--emit-config", "--format", "kuberay", "--image", "me/x:1")
    assert other["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]["image"] == "me/x:1"


@pytest.mark.parametrize("command", ["train", "serve"])
def test_a_model_directory_of_this_machine_is_refused_in_a_manifest(command, tmp_path, tiny_model, greeting_data):
    if command == "train":
        spec = write_spec(tmp_path / "job.yaml", name="t", model=str(tiny_model), dataset=str(greeting_data),
                          max_steps=1, storage="s3://bucket/runs")
        args = ["train", str(spec), "--emit-config"]
    else:
        args = ["serve", str(tiny_model), "--emit-config", "--format", "kuberay"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 1 and "directory on this machine" in r.output and "To fix:" in r.output
    assert "Traceback" not in r.output


def test_a_manifest_for_a_job_without_storage_is_refused(tmp_path, greeting_data):
    spec = write_spec(tmp_path / "job.yaml", name="t", model="qwen2.5-0.5b", dataset=str(greeting_data), max_steps=1)
    r = CliRunner().invoke(main, ["train", str(spec), "--emit-config"])
    assert r.exit_code == 1 and "storage: is not set" in r.output


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


def test_an_a100_80gb_worker_group_declares_the_size_label_ray_does_not_add():
    manifest = emitted("serve", "llama-3.1-70b", "--gpu", "A100-80GB", "--emit-config", "--format", "kuberay")
    assert_valid(manifest, "rayservices")
    (group,) = manifest["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    assert group["rayStartParams"]["resources"] == '"{\\"accelerator_type:A100-80G\\": 1}"'
    h100 = emitted("serve", "llama-3.1-70b", "--gpu", "H100", "--emit-config", "--format", "kuberay")
    assert "resources" not in h100["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["rayStartParams"]
