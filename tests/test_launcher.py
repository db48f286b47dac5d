"""cluster.yaml: passes Ray's own schema and the checks Ray does not do."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from gpufleet.catalogue.errors import SpecError
from gpufleet.catalogue.placement import node_types_from_cluster_config
from gpufleet.cluster.launcher import gpufleet_errors, ray_schema_errors, validate_cluster_config

CLUSTER_YAML = Path(__file__).parents[1] / "cluster.yaml"


@pytest.fixture
def config():
    return yaml.safe_load(CLUSTER_YAML.read_text())


def test_shipped_cluster_yaml_is_valid():
    validate_cluster_config(CLUSTER_YAML)


def test_shipped_cluster_yaml_covers_catalogue_gpus_and_scales_from_zero(config):
    types = config["available_node_types"]
    labels = {k for t in types.values() for k in t["resources"] if k.startswith("accelerator_type:")}
    assert {"accelerator_type:A10G", "accelerator_type:A100-80G", "accelerator_type:H100"} <= labels
    assert all(t.get("min_workers", 0) == 0 for t in types.values())


def test_typo_key_is_caught_by_rays_schema(config):
    config["max_workerz"] = 3
    assert ray_schema_errors(config)


def test_min_workers_above_max_is_caught(config):
    config["available_node_types"]["h100x8"]["min_workers"] = 3
    assert any("h100x8: min_workers=3 exceeds max_workers=2" in e for e in gpufleet_errors(config))


def test_gpu_count_must_match_instance_type(config):
    config["available_node_types"]["h100x8"]["resources"]["GPU"] = 4
    assert any("p5.48xlarge has 8 GPUs" in e for e in gpufleet_errors(config))


def test_accelerator_label_must_match_instance_type(config):
    del config["available_node_types"]["a10gx1"]["resources"]["accelerator_type:A10G"]
    assert any("lack 'accelerator_type:A10G'" in e for e in gpufleet_errors(config))


def test_invalid_file_lists_the_problem(tmp_path, config):
    config["available_node_types"]["t4x1"]["min_workers"] = 9
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump(config))
    with pytest.raises(SpecError, match="t4x1: min_workers=9 exceeds max_workers=8"):
        validate_cluster_config(f)


def test_node_types_become_launchable_capacity(config):
    types = {t.name: t for t in node_types_from_cluster_config(config)}
    assert "head" not in types and types["h100x8"].gpus == 8 and types["h100x8"].max_count == 2


def test_cluster_yaml_that_is_not_yaml_is_one_line(tmp_path):
    bad = tmp_path / "cluster.yaml"
    bad.write_text("cluster_name: x\n  provider: [unclosed\n")
    with pytest.raises(SpecError, match="not valid YAML .* To fix: correct the YAML syntax"):
        validate_cluster_config(bad)


def test_spot_worker_types_sit_beside_on_demand_ones(config):
    types = config["available_node_types"]
    spot = {n for n, t in types.items() if t["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot"}
    assert spot and all(n.removesuffix("-spot") in types for n in spot)


def test_every_node_runs_the_gpufleet_image_of_this_version_and_installs_nothing_at_boot(config):
    from gpufleet.cluster.image import default_image

    assert config["docker"]["image"] == default_image()
    assert config["setup_commands"] == [] and "~/gpufleet" not in config["file_mounts"]
    assert "--gpus all" in config["docker"]["worker_run_options"]


@pytest.mark.parametrize("kind", ["head_start_ray_commands", "worker_start_ray_commands"])
def test_every_node_starts_ray_in_haproxy_mode(config, kind):
    # the command as `ray up` runs it, with `env` in place of `ray start`: what Ray's processes would inherit
    (command,) = config[kind]
    prefix = command.split("ray start")[0]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    r = subprocess.run(["bash", "-c", prefix + "env"], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    started = dict(line.split("=", 1) for line in r.stdout.splitlines() if "=" in line)
    assert started["RAY_SERVE_ENABLE_HA_PROXY"] == "1" and started["RAY_AUTH_MODE"] == "token"
    assert os.access(started["RAY_SERVE_HAPROXY_BINARY_PATH"], os.X_OK)


def test_up_cluster_creates_the_token_the_file_mounts_copy(tmp_path):
    from gpufleet.cluster.head import ensure_token

    token = ensure_token(tmp_path / "state")
    assert token.read_text() and oct(token.stat().st_mode & 0o777) == "0o600"
    assert ensure_token(tmp_path / "state").read_text() == token.read_text()  # kept, not rotated
