"""Checks on a Ray cluster-launcher config (cluster.yaml): Ray's own schema, then ours.

Ray's ``validate_config`` catches typo keys, wrong types and unknown providers; it does not
catch a node type whose ``min_workers`` exceeds its ``max_workers``, nor resources that disagree
with the instance type (a p5.48xlarge declared with 4 GPUs, or labelled A10G). These do.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from gpufleet.catalogue.errors import SpecError, fix
from gpufleet.catalogue.specfile import read_yaml

# AWS instance type -> (GPUs, gpufleet GPU type). Source: AWS instance type pages.
AWS_GPU_INSTANCES: dict[str, tuple[int, str]] = {
    "g4dn.xlarge": (1, "T4"), "g4dn.12xlarge": (4, "T4"),
    "g5.xlarge": (1, "A10G"), "g5.2xlarge": (1, "A10G"), "g5.12xlarge": (4, "A10G"), "g5.48xlarge": (8, "A10G"),
    "g6.xlarge": (1, "L4"), "g6.12xlarge": (4, "L4"), "g6e.xlarge": (1, "L40S"), "g6e.12xlarge": (4, "L40S"),
    "p3dn.24xlarge": (8, "V100-32GB"), "p4d.24xlarge": (8, "A100-40GB"), "p4de.24xlarge": (8, "A100-80GB"),
    "p5.48xlarge": (8, "H100-80GB"), "p5e.48xlarge": (8, "H200"),
}


def ray_schema_errors(config: dict[str, Any]) -> list[str]:
    """Ray's own offline check (prepare_config + validate_config), as messages."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    try:
        validate_config(prepare_config(copy.deepcopy(config)))
    except Exception as e:  # jsonschema.ValidationError, ValueError
        return [f"Ray schema: {getattr(e, 'message', e)}"]
    return []


def gpufleet_errors(config: dict[str, Any]) -> list[str]:
    """Checks Ray does not do. Each message names the node type, the value and the fix."""
    from gpufleet.catalogue.gpus import get_gpu

    errors = []
    types = config.get("available_node_types", {})
    if config.get("head_node_type") not in types:
        errors.append(fix(f"head_node_type {config.get('head_node_type')!r} is not in available_node_types",
                          f"use one of {list(types)}"))
    total_min = 0
    for name, t in types.items():
        lo, hi = t.get("min_workers", 0), t.get("max_workers", 0)
        total_min += lo
        if lo > hi:
            errors.append(fix(f"{name}: min_workers={lo} exceeds max_workers={hi}", "make min_workers <= max_workers"))
        instance = t.get("node_config", {}).get("InstanceType")
        res = t.get("resources", {})
        if instance in AWS_GPU_INSTANCES:
            gpus, gpu_type = AWS_GPU_INSTANCES[instance]
            if res.get("GPU", 0) != gpus:
                errors.append(fix(f"{name}: resources.GPU={res.get('GPU', 0)} but {instance} has {gpus} GPUs",
                                  f"set resources.GPU: {gpus}"))
            label = f"accelerator_type:{get_gpu(gpu_type).ray_accelerator_type}"
            if res.get(label) is None:
                errors.append(fix(f"{name}: resources lack {label!r} for {instance}'s {gpu_type}",
                                  f"add '{label}': 1 so plans for {gpu_type} can land here"))
        elif res.get("GPU"):
            errors.append(fix(f"{name}: declares GPU={res['GPU']} but instance type {instance!r} is not a known GPU "
                              "instance", f"use one of {sorted(AWS_GPU_INSTANCES)}"))
    if total_min > config.get("max_workers", total_min):
        errors.append(fix(f"the node types' min_workers add up to {total_min}, above max_workers="
                          f"{config['max_workers']}", "raise max_workers or lower min_workers"))
    return errors


def load_cluster_config(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise SpecError(fix(f"cluster config {p} not found", "pass the path of cluster.yaml"))
    config = read_yaml(p)
    if not isinstance(config, dict):
        raise SpecError(fix(f"{p}: expected a mapping of keys", "see the cluster.yaml gpufleet ships"))
    return config


def validate_cluster_config(path: str | Path) -> dict[str, Any]:
    """Load and check a cluster.yaml; raise SpecError listing every problem."""
    config = load_cluster_config(path)
    errors = ray_schema_errors(config) + gpufleet_errors(config)
    if errors:
        raise SpecError(f"{path}: " + "; ".join(errors))
    return config
