"""A serve app that no node can hold is refused before anything is deployed, not left DEPLOYING."""

import time

import pytest
import ray

from gpufleet.catalogue.errors import PlanError
from gpufleet.cluster.head import free_port
from gpufleet.serve_apps.app import deploy
from gpufleet.serve_apps.spec import ModelEntry, ServeSpec

pytestmark = pytest.mark.slow


def test_app_the_cluster_can_never_hold_is_refused_at_once(tiny_model, short_tmp):
    spec = ServeSpec(name="big", port=free_port(), ingress="router",
                     models=[ModelEntry(id="t", source=str(tiny_model), max_model_len=256, replicas={"min": 2, "max": 2})])
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    try:
        t0 = time.monotonic()
        with pytest.raises(PlanError, match=r"serve app big needs \{'CPU': 3.0\} in all .* OpenAI router"):
            deploy(spec, short_tmp)
        assert time.monotonic() - t0 < 10
    finally:
        ray.shutdown()


def test_app_waiting_on_busy_resources_says_what_it_waits_for(tiny_model, short_tmp):
    from ray.util.placement_group import placement_group, remove_placement_group

    spec = ServeSpec(name="busy", port=free_port(), models=[ModelEntry(id="t", source=str(tiny_model), max_model_len=256)])
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    try:
        hog = placement_group([{"CPU": 2}])  # the cluster could hold the app, but not while this holds its CPUs
        ray.get(hog.ready(), timeout=30)
        said = []
        with pytest.raises(PlanError, match=r"busy is not running after \d+s: 1 replica\(s\) wait for resources CPU 1; "
                                            r"free now: none of them"):
            deploy(spec, short_tmp, report=said.append, stall_s=4, timeout_s=14)
        assert said and all("busy still deploying after" in line for line in said)
        assert "wait for resources CPU 1" in said[-1]
        remove_placement_group(hog)  # ray.shutdown below ends this cluster, its Serve app with it
    finally:
        ray.shutdown()
