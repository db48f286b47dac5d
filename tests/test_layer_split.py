"""generate() over several GPUs of one node: the device_map and max_memory a plan gives are the ones
accelerate produces, every weight has a GPU, and TransformerLens splits follow its own rule."""

import json

import pytest
import torch
from accelerate import init_empty_weights
from accelerate.utils import infer_auto_device_map
from click.testing import CliRunner
from transformers import AutoConfig, AutoModelForCausalLM

from gpufleet.catalogue.errors import PlanError
from gpufleet.catalogue.model import MODELS_DIR, load_model
from gpufleet.catalogue.planner import plan
from gpufleet.cli import main

# (model, GPU, GPUs): tied and untied heads, fp16-only GPUs, uneven layer counts
CASES = [("gemma-2-9b", "P4", 4), ("llama-3.1-8b", "T4", 2), ("qwen2.5-7b", "P4", 4), ("phi-3-mini-4k", "P4", 2),
         ("llama-3.2-3b", "P4", 2), ("qwen2.5-14b", "T4", 3)]


def meta_model(name: str):
    cfg = AutoConfig.for_model(**json.loads((MODELS_DIR / f"{name}.json").read_text()))
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(cfg)
    model.tie_weights()  # as from_pretrained does after loading
    return model


def device_of(device_map: dict, name: str):
    """The device a (possibly cleaned, i.e. grouped) device_map gives ``name``."""
    keys = [k for k in device_map if k == "" or name == k or name.startswith(k + ".")]
    return device_map[max(keys, key=len)]


@pytest.mark.parametrize(("name", "gpu", "n"), CASES)
def test_max_memory_makes_accelerate_produce_the_planned_device_map(name, gpu, n):
    p = plan(load_model(name), "generate", gpu, gpus=n)
    model = meta_model(name)
    theirs = infer_auto_device_map(model, max_memory=p.split.max_memory, dtype=torch.float16,
                                   no_split_module_classes=list(model._no_split_modules))
    ours = p.split.device_map
    assert {m: device_of(theirs, m) for m in ours} == ours


@pytest.mark.parametrize(("name", "gpu", "n"), CASES[:3])
def test_device_map_gives_every_parameter_and_buffer_a_gpu(name, gpu, n):
    p = plan(load_model(name), "generate", gpu, gpus=n)
    model = meta_model(name)
    names = [k for k, _ in model.named_parameters()] + [k for k, _ in model.named_buffers()]
    assert all(device_of(p.split.device_map, k) in range(n) for k in names)
    assert set(p.split.device_map.values()) == set(range(n))


def test_gemma2_9b_fits_four_p4_in_fp16_with_the_overflow_caveat():
    p = plan(load_model("gemma-2-9b"), "generate", "P4")
    assert (p.gpus, p.dtype, p.nodes) == (4, "float16", 1)
    assert all(peak < p.gpu_bytes for peak in p.split.peak_per_gpu)
    assert any("overflow" in n for n in p.notes)


def test_the_first_gpu_holds_the_embeddings_and_the_last_the_untied_head():
    p = plan(load_model("llama-3.1-8b"), "generate", "T4", gpus=2)
    dm = p.split.device_map
    assert dm["model.embed_tokens"] == 0 and dm["lm_head"] == 1 and dm["model.norm"] == 1


def test_generate_never_spans_nodes():
    with pytest.raises(PlanError, match="one node"):
        plan(load_model("llama-3.1-70b"), "generate", "T4", gpus=16, gpus_per_node=8)
    p = plan(load_model("llama-3.1-70b"), "generate", "A10G", gpus_per_node=8)
    assert p.nodes == 1 and p.placement.strategy == "STRICT_PACK"


def test_infer_plans_stay_on_one_node_too():
    p = plan(load_model("llama-3.1-8b"), "infer", "T4", gpus_per_node=4)
    assert p.nodes == 1 and p.gpus <= 4


def test_transformerlens_split_follows_its_layers_per_device_rule():
    p = plan(load_model("llama-3.1-70b"), "generate", "RTX4090")
    bf16 = next(t for t in p.transformerlens if t.dtype == "bfloat16")
    per = 80 // bf16.n_devices
    assert bf16.layers_per_gpu == [sum(1 for i in range(80) if i // per == d) for d in range(bf16.n_devices)]
    assert all(w < 24 * 2**30 for w in bf16.weights_per_gpu)
    assert all(t.dtype != "float32" for t in p.transformerlens)  # 280 GB of fp32 does not fit 8 x 24 GB


def test_emit_device_map_prints_what_from_pretrained_takes():
    r = CliRunner().invoke(main, ["plan", "gemma-2-9b", "--task", "generate", "--gpu", "P4", "--emit", "device-map"])
    d = json.loads(r.output)
    assert set(d) == {"device_map", "max_memory"} and d["device_map"]["model.embed_tokens"] == 0
    assert list(d["max_memory"]) == ["0", "1", "2", "3"] and d["max_memory"]["0"].endswith("MiB")


def test_emit_on_a_serve_plan_is_one_line():
    r = CliRunner().invoke(main, ["plan", "llama-3.2-1b", "--task", "serve", "--gpu", "H100", "--emit", "device-map"])
    assert r.exit_code == 1 and "--task generate" in r.output and "Traceback" not in r.output
