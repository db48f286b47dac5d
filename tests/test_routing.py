"""Which router picks a model's replica: the spec's `router:`, resolved without starting anything."""

import pytest
from pydantic import ValidationError

from gpufleet.serve_apps.app import PREFIX_ROUTER, STARTUP_CALLBACK, llm_config_dict
from gpufleet.serve_apps.spec import ModelEntry, ServeSpec, resolve_router


def entry(tiny_model, **over):
    return ModelEntry(**{"id": "tiny", "source": str(tiny_model), "max_model_len": 256, **over})


def test_auto_routes_on_prefixes_only_when_prompts_share_one_and_there_are_replicas_to_choose(tiny_model):
    assert resolve_router(entry(tiny_model)) == "default"
    assert resolve_router(entry(tiny_model, shared_prefix_tokens=500)) == "default"  # one replica
    assert resolve_router(entry(tiny_model, shared_prefix_tokens=500, replicas={"max": 2})) == "prefix"
    assert resolve_router(entry(tiny_model, router="prefix")) == "prefix"


def test_a_prefix_routed_model_gets_ray_serve_llms_prefix_router_and_cache_hit_counts(tiny_model, tmp_path):
    conf = llm_config_dict(entry(tiny_model, router="prefix", replicas={"max": 2}), tmp_path)
    assert conf["deployment_config"]["request_router_config"] == {"request_router_class": PREFIX_ROUTER}
    assert conf["engine_kwargs"]["enable_prompt_tokens_details"] is True
    plain = llm_config_dict(entry(tiny_model), tmp_path)
    assert "request_router_config" not in plain["deployment_config"]
    assert plain["callback_config"] == {"callback_class": STARTUP_CALLBACK}


def test_prefix_routing_makes_auto_ingress_the_router_even_behind_haproxy(tiny_model):
    spec = ServeSpec(models=[entry(tiny_model, router="prefix")])
    assert spec.ingress_mode(haproxy=True) == "router"
    assert ServeSpec(models=[entry(tiny_model)]).ingress_mode(haproxy=True) == "direct"


def test_prefix_routing_with_direct_ingress_is_refused_naming_the_fix(tiny_model):
    with pytest.raises(ValidationError, match="only the router ingress reads.*set ingress: router"):
        ServeSpec(ingress="direct", models=[entry(tiny_model, router="prefix")])
