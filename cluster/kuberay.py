"""KubeRay manifests from gpufleet's plans: a ``RayService`` for a serve app, a ``RayJob`` for a fine-tune.

The worker groups are the plans' placements turned into pods: one pod per Ray node, its GPUs
requested as ``nvidia.com/gpu`` and started with ``num-gpus``, pinned to the GPU model by NVIDIA GPU
feature discovery's ``nvidia.com/gpu.product`` label, its CPUs (and, for offload plans, host memory)
those of the node's bundles. Pure: plans in, dicts out; tests check them against KubeRay's own CRDs.
"""

from __future__ import annotations

import copy
import json
import math
from typing import Any

import yaml
from pydantic import Field

from gpufleet.catalogue.config import Config
from gpufleet.catalogue.gpus import GPU_TYPES
from gpufleet.catalogue.placement import ACCELERATOR_PREFIX, MEMORY, Placement, sum_bundles
from gpufleet.cluster.image import default_image, ray_version

GIB = 2**30
MEMORY_PER_GPU_GIB = 16  # host RAM per GPU when the plan reserves none (loading weights, the engine's host side)
HEAD_CPUS, HEAD_MEMORY = "4", "16Gi"
# gpufleet GPU type -> NVIDIA GPU feature discovery's nvidia.com/gpu.product label (the usual SKU).
GPU_PRODUCT = {
    "B200": "NVIDIA-B200", "H200": "NVIDIA-H200", "H100-80GB": "NVIDIA-H100-80GB-HBM3", "A100-80GB": "NVIDIA-A100-SXM4-80GB",
    "A100-40GB": "NVIDIA-A100-SXM4-40GB", "L40S": "NVIDIA-L40S", "L40": "NVIDIA-L40", "L4": "NVIDIA-L4", "A10G": "NVIDIA-A10G",
    "RTX-4090": "NVIDIA-GeForce-RTX-4090", "RTX-3090": "NVIDIA-GeForce-RTX-3090", "V100-32GB": "Tesla-V100-SXM2-32GB", "T4": "Tesla-T4", "P4": "Tesla-P4",
    "M60": "Tesla-M60",
}


def _container(name: str, image: str, cpus: float, memory_gib: float, gpus: int = 0,
               ports: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    limits: dict[str, Any] = {"cpu": str(math.ceil(cpus)), "memory": f"{math.ceil(memory_gib)}Gi"}
    if gpus:
        limits["nvidia.com/gpu"] = gpus
    c: dict[str, Any] = {"name": name, "image": image, "resources": {"limits": limits, "requests": dict(limits)}}
    if ports:
        c["ports"] = ports
    return c


def head_group(image: str) -> dict[str, Any]:
    """A CPU-only head: nothing is scheduled on it (num-cpus 0), it runs GCS, the dashboard and Serve's proxy."""
    ports = [{"containerPort": 6379, "name": "gcs-server"}, {"containerPort": 8265, "name": "dashboard"},
             {"containerPort": 10001, "name": "client"}, {"containerPort": 8000, "name": "serve"}]
    container = _container("ray-head", image, float(HEAD_CPUS), float(HEAD_MEMORY[:-2]), ports=ports)
    return {"rayStartParams": {"dashboard-host": "0.0.0.0", "num-cpus": "0"}, "template": {"spec": {
        "containers": [container]}}}


def worker_group(name: str, placement: Placement, gpu: str, gpus_per_node: int, image: str,
                 min_groups: int = 1, max_groups: int = 1) -> dict[str, Any]:
    """Pods for ``min_groups``..``max_groups`` copies of a placement, ``gpus_per_node`` GPUs a pod."""
    per_pod = min(gpus_per_node, len(placement.bundles))
    pods_per_group = math.ceil(len(placement.bundles) / per_pod)
    node = sum_bundles(placement.bundles[:per_pod])
    cpus = node.get("CPU", 0) + 1  # +1 for the raylet and the engine's helpers
    memory = node[MEMORY] / GIB + 8 if node.get(MEMORY) else MEMORY_PER_GPU_GIB * per_pod
    gpus = per_pod if placement.use_gpu else 0
    spec: dict[str, Any] = {"containers": [_container("ray-worker", image, cpus, memory, gpus=gpus)]}
    if gpus:
        spec["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
        if gpu in GPU_PRODUCT:
            spec["nodeSelector"] = {"nvidia.com/gpu.product": GPU_PRODUCT[gpu]}
    start = {"num-gpus": str(gpus), "num-cpus": str(math.ceil(cpus))}
    declared = {k: 1 for k in placement.bundles[0] if k.startswith(ACCELERATOR_PREFIX)}
    if gpus and gpu in GPU_TYPES and not GPU_TYPES[gpu].ray_detects_label:
        # the size label Ray does not add itself (A100-40G / A100-80G); KubeRay pastes the value into a
        # shell command line, hence the quoted JSON, as in KubeRay's own examples
        start["resources"] = '"' + json.dumps(declared).replace('"', '\\"') + '"'
    return {"groupName": _k8s_name(name), "replicas": min_groups * pods_per_group,
            "minReplicas": min_groups * pods_per_group, "maxReplicas": max_groups * pods_per_group,
            "rayStartParams": start, "template": {"spec": spec}}


def ray_service(name: str, serve_config: dict[str, Any], groups: list[dict[str, Any]],
                image: str | None = None, secrets: PodSecrets | None = None) -> dict[str, Any]:
    """A ``ray.io/v1`` RayService running ``serve_config`` (the file ``gpufleet serve --emit-config`` prints)."""
    head = head_group(image or default_image())
    with_secrets([head, *groups], secrets or PodSecrets())
    return {"apiVersion": "ray.io/v1", "kind": "RayService", "metadata": {"name": _k8s_name(name)}, "spec": {
        "serveConfigV2": yaml.safe_dump(serve_config, sort_keys=False),
        "rayClusterConfig": {"rayVersion": ray_version(), "enableInTreeAutoscaling": True,
                             "headGroupSpec": head, "workerGroupSpecs": groups}}}


def ray_job(name: str, entrypoint: str, group: dict[str, Any], image: str | None = None,
            secrets: PodSecrets | None = None, files: JobFiles | None = None) -> list[dict[str, Any]]:
    """A ``ray.io/v1`` RayJob: a cluster for one fine-tune, torn down when it ends (its results go to the spec's
    storage, since the pods go with the cluster); with ``files``, the ConfigMap holding its spec and data,
    mounted in every pod, before it."""
    head = head_group(image or default_image())
    with_secrets([head, group], secrets or PodSecrets())
    job = {"apiVersion": "ray.io/v1", "kind": "RayJob", "metadata": {"name": _k8s_name(name)}, "spec": {
        "entrypoint": entrypoint, "shutdownAfterJobFinishes": True, "ttlSecondsAfterFinished": 600,
        "rayClusterSpec": {"rayVersion": ray_version(), "headGroupSpec": head, "workerGroupSpecs": [group]}}}
    if not files:
        return [job]
    config_map = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": _k8s_name(f"{name}-files")},
                  "data": dict(files.data)}
    volume = {"name": "job-files", "configMap": {"name": config_map["metadata"]["name"], "items": [
        {"key": key, "path": path} for key, path in files.paths.items()]}}
    for g in (head, group):
        g["template"]["spec"].setdefault("volumes", []).append(copy.deepcopy(volume))  # no YAML anchors
        for c in g["template"]["spec"]["containers"]:
            c.setdefault("volumeMounts", []).append({"name": "job-files", "mountPath": files.mount_path,
                                                     "readOnly": True})
    return [config_map, job]


class PodSecrets(Config):
    """Where the pods' credentials come from: Kubernetes Secrets, never the manifest."""

    hf_token_secret: str = Field(default="hf-token", description=(
        "Secret whose key HF_TOKEN becomes every pod's HF_TOKEN (gated Hub models); optional."))
    storage_secret: str = Field(default="gpufleet-storage", description=(
        "Secret whose keys become every pod's environment (e.g. AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, "
        "AWS_REGION for s3:// storage); optional."))


class JobFiles(Config):
    """A job's files as ConfigMap data, mounted at ``mount_path`` in every pod."""

    data: dict[str, str] = Field(description="ConfigMap key -> file content.")
    paths: dict[str, str] = Field(description="ConfigMap key -> path under mount_path.")
    mount_path: str = "/home/ray/gpufleet-job"


def with_secrets(groups: list[dict[str, Any]], secrets: PodSecrets) -> None:
    """Every container of ``groups`` gets HF_TOKEN and the storage settings from their Secrets (optional ones:
    a manifest applies before they exist, and a public model needs neither)."""
    for g in groups:
        for c in g["template"]["spec"]["containers"]:
            c["env"] = [{"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {
                "name": secrets.hf_token_secret, "key": "HF_TOKEN", "optional": True}}}]
            c["envFrom"] = [{"secretRef": {"name": secrets.storage_secret, "optional": True}}]


def _k8s_name(name: str) -> str:
    """A DNS-1123 name: lower case, digits and '-'."""
    out = "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")
    return out[:63] or "gpufleet"
