"""KubeRay manifests from gpufleet's plans: a ``RayService`` for a serve app, a ``RayJob`` for a fine-tune.

The worker groups are the plans' placements turned into pods: one pod per Ray node, its GPUs
requested as ``nvidia.com/gpu`` and started with ``num-gpus``, pinned to the GPU model by NVIDIA GPU
feature discovery's ``nvidia.com/gpu.product`` label, its CPUs (and, for offload plans, host memory)
those of the node's bundles. Pure: plans in, dicts out; tests check them against KubeRay's own CRDs.
"""

from __future__ import annotations

import math
from typing import Any

import yaml

from gpufleet.catalogue.placement import MEMORY, Placement, sum_bundles

DEFAULT_IMAGE = "rayproject/ray-llm:2.60.0-py311-cu128"
RAY_VERSION = "2.60.0"
GIB = 2**30
MEMORY_PER_GPU_GIB = 16  # host RAM per GPU when the plan reserves none (loading weights, the engine's host side)
HEAD_CPUS, HEAD_MEMORY = "4", "16Gi"
# gpufleet GPU type -> NVIDIA GPU feature discovery's nvidia.com/gpu.product label (the usual SKU).
GPU_PRODUCT = {
    "H200": "NVIDIA-H200", "H100-80GB": "NVIDIA-H100-80GB-HBM3", "A100-80GB": "NVIDIA-A100-SXM4-80GB",
    "A100-40GB": "NVIDIA-A100-SXM4-40GB", "L40S": "NVIDIA-L40S", "L4": "NVIDIA-L4", "A10G": "NVIDIA-A10G",
    "RTX-4090": "NVIDIA-GeForce-RTX-4090", "V100-32GB": "Tesla-V100-SXM2-32GB", "T4": "Tesla-T4", "P4": "Tesla-P4",
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
    return {"groupName": _k8s_name(name), "replicas": min_groups * pods_per_group,
            "minReplicas": min_groups * pods_per_group, "maxReplicas": max_groups * pods_per_group,
            "rayStartParams": {"num-gpus": str(gpus), "num-cpus": str(math.ceil(cpus))},
            "template": {"spec": spec}}


def ray_service(name: str, serve_config: dict[str, Any], groups: list[dict[str, Any]],
                image: str = DEFAULT_IMAGE) -> dict[str, Any]:
    """A ``ray.io/v1`` RayService running ``serve_config`` (the file ``gpufleet serve --emit-config`` prints)."""
    return {"apiVersion": "ray.io/v1", "kind": "RayService", "metadata": {"name": _k8s_name(name)}, "spec": {
        "serveConfigV2": yaml.safe_dump(serve_config, sort_keys=False),
        "rayClusterConfig": {"rayVersion": RAY_VERSION, "enableInTreeAutoscaling": True,
                             "headGroupSpec": head_group(image), "workerGroupSpecs": groups}}}


def ray_job(name: str, entrypoint: str, group: dict[str, Any], image: str = DEFAULT_IMAGE) -> dict[str, Any]:
    """A ``ray.io/v1`` RayJob: a cluster for one fine-tune, torn down when it ends (its output_dir should be
    shared storage, since the pods go with the cluster)."""
    return {"apiVersion": "ray.io/v1", "kind": "RayJob", "metadata": {"name": _k8s_name(name)}, "spec": {
        "entrypoint": entrypoint, "shutdownAfterJobFinishes": True, "ttlSecondsAfterFinished": 600,
        "rayClusterSpec": {"rayVersion": RAY_VERSION, "headGroupSpec": head_group(image),
                           "workerGroupSpecs": [group]}}}


def _k8s_name(name: str) -> str:
    """A DNS-1123 name: lower case, digits and '-'."""
    out = "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")
    return out[:63] or "gpufleet"
