"""Training for real: Ray Train workers running DeepSpeed (gloo, CPU) on a tiny random-init model."""

import hashlib
import json
import os
import signal
import subprocess
import threading

import pytest
import ray
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from gpufleet.cluster.adapter_store import adapter_version
from gpufleet.jobs.finetune import TRAIN_ENV, run
from gpufleet.jobs.layout import TrainLayout
from tests.conftest import placed_bundles, planned_bundles, wait_for_step, write_spec

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=4, include_dashboard=False, logging_level="ERROR", runtime_env={"env_vars": TRAIN_ENV})
    yield
    ray.shutdown()


def job(tmp_path, tiny_model, data, **over):
    fields = dict(name="t", model=str(tiny_model), dataset=str(data), task="lora", learning_rate=3e-3,
                  max_steps=20, global_batch=4, seq_len=64, checkpoint_every=10, log_every=5,
                  output_dir=str(tmp_path / "out"), plan={"workers": 2, "zero_stage": 2})
    fields.update(over)
    return write_spec(tmp_path / "job.yaml", **fields)


def losses(out_dir) -> list[dict]:
    return [json.loads(x) for x in (out_dir / "metrics.jsonl").read_text().splitlines()]


def generate(model, tok) -> str:
    enc = tok.apply_chat_template([{"role": "user", "content": "Greet bob."}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=8, do_sample=False)
    return tok.decode(out[0][enc["input_ids"].shape[1]:])


# One LoRA run on two workers, read by several tests below: each run costs about 25 s of fixed start
# (controller, workers, imports) on two cores, so behaviours of the same layout share it. Its shape is
# also the killed-worker test's, whose uninterrupted baseline it is.
RESUMABLE = dict(max_steps=30, checkpoint_every=5, seq_len=128, global_batch=8, max_failures=1)


@pytest.fixture(scope="module")
def lora_run(local_ray, tmp_path_factory, tiny_model, greeting_data):
    """The output dir, summary and the placement groups Ray created for one uninterrupted LoRA ZeRO-2 run."""
    d = tmp_path_factory.mktemp("lora-run")
    before = set(ray.util.placement_group_table())
    summary = run(job(d, tiny_model, greeting_data, **RESUMABLE))
    created = [g for pid, g in ray.util.placement_group_table().items() if pid not in before]
    return d / "out", summary, created


def test_ray_train_reserves_exactly_the_layouts_placement(lora_run):
    _, summary, created = lora_run
    placement = TrainLayout(**summary["layout"]).placement
    assert [(placed_bundles(g), g["strategy"]) for g in created] == [
        (planned_bundles(placement.bundles), placement.strategy)]


@pytest.mark.parametrize("task", ["lora", "full"])
@pytest.mark.parametrize("grad_ckpt", [True, False])
def test_a_checkpointed_layout_recomputes_each_layer_in_backward(tmp_path, tiny_model, greeting_data, task, grad_ckpt):
    from gpufleet.catalogue.placement import Placement
    from gpufleet.jobs.spec import JobSpec
    from gpufleet.jobs.train_loop import build_model

    spec = JobSpec(name="t", model=str(tiny_model), dataset=str(greeting_data), task=task, output_dir=str(tmp_path),
                   max_steps=1)
    layout = TrainLayout(placement=Placement(bundles=[{"CPU": 1}], strategy="PACK"), zero_stage=0,
                         grad_ckpt=grad_ckpt, micro_batch=1, grad_accum=1, dtype="float32")
    model = build_model(spec, layout, tiny_model, torch.device("cpu"))
    layer = next(m for m in model.modules() if type(m).__name__.endswith("DecoderLayer"))
    calls = []
    layer.register_forward_pre_hook(lambda *_: calls.append(1))
    ids = torch.randint(0, 100, (1, 16))
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    assert len(calls) == (2 if grad_ckpt else 1)  # checkpointing runs the layer again in backward
    assert out.past_key_values is None  # no KV cache is built while training


@pytest.mark.parametrize("task,stage,lr", [("lora", 2, 3e-3), ("lora", 3, 3e-3), ("full", 2, 1e-3), ("full", 3, 1e-3)])
def test_two_workers_learn_and_export_a_servable_result(request, tmp_path, tiny_model, greeting_data, task, stage, lr):
    if (task, stage) == ("lora", 2):
        out, summary, _ = request.getfixturevalue("lora_run")
    else:
        request.getfixturevalue("local_ray")
        out = tmp_path / "out"
        summary = run(job(tmp_path, tiny_model, greeting_data, task=task, learning_rate=lr,
                          plan={"workers": 2, "zero_stage": stage}))
    steps = summary["metrics"]["total_steps"]
    hist = losses(out)
    assert [h["step"] for h in hist] == list(range(1, steps + 1))
    assert hist[-1]["loss"] < 0.8 * hist[0]["loss"]
    final = out / "final"
    tok = AutoTokenizer.from_pretrained(final)
    if task == "lora":
        from peft import AutoPeftModelForCausalLM

        assert (final / "adapter_config.json").exists() and (final / "adapter_model.safetensors").exists()
        model = AutoPeftModelForCausalLM.from_pretrained(final)
    else:
        model = AutoModelForCausalLM.from_pretrained(final)
    assert generate(model, tok).strip()
    ckpt_files = {p.name for p in (out / "ray" / "t" / f"step_{steps:06d}" / "ckpt").iterdir()}
    # every rank's optimizer shard is in the checkpoint, not only rank 0's
    assert {"zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"} <= ckpt_files
    assert summary["metrics"]["step"] == steps


def test_qlora_trains_adapters_on_an_nf4_base_and_exports_them(local_ray, tmp_path, tiny_model, greeting_data):
    summary = run(job(tmp_path, tiny_model, greeting_data, task="qlora", plan={"workers": 2}))
    assert summary["layout"]["zero_stage"] == 0 and summary["layout"]["grad_ckpt"]
    hist = losses(tmp_path / "out")
    assert [h["step"] for h in hist] == list(range(1, 21)) and hist[-1]["loss"] < 0.8 * hist[0]["loss"]
    final = tmp_path / "out" / "final"
    assert json.loads((final / "adapter_config.json").read_text())["r"] > 0
    assert not (final / "model.safetensors").exists()  # adapters only, the base stays the user's


def test_killed_worker_resumes_from_checkpoint_without_repeating_steps(lora_run, tmp_path, tiny_model, greeting_data):
    baseline = losses(lora_run[0])[-1]["loss"]  # the same job, never interrupted
    kill_dir = tmp_path / "kill"
    kill_dir.mkdir()

    killed = {}

    def killer():
        at = wait_for_step(kill_dir / "out" / "metrics.jsonl", 8, timeout_s=300, poll_s=0.02)
        if at is not None:
            killed["pid"], killed["at"] = int((kill_dir / "out" / "pids" / "rank1.pid").read_text()), at
            os.kill(killed["pid"], signal.SIGKILL)

    t = threading.Thread(target=killer)
    t.start()
    summary = run(job(kill_dir, tiny_model, greeting_data, **RESUMABLE))
    t.join()
    assert killed and 8 <= killed["at"] < 30, killed
    hist = losses(kill_dir / "out")
    resumed = [h for h in hist if h["resumed_from"] > 0]
    assert resumed, "the run must have resumed from a checkpoint"
    start = resumed[0]["resumed_from"]
    assert start % 5 == 0 and start <= killed["at"]
    assert [h["step"] for h in resumed] == list(range(start + 1, 31))  # continuous, nothing skipped
    assert summary["metrics"]["step"] == 30
    assert resumed[-1]["loss"] <= baseline * 1.01 + 1e-3


def test_optimizer_offload_trains_on_the_specs_schedule(local_ray, tmp_path, tiny_model, greeting_data):
    from gpufleet.jobs.train_loop import lr_lambda

    run(job(tmp_path, tiny_model, greeting_data, max_steps=6, checkpoint_every=3, warmup_steps=2, schedule="linear",
            plan={"workers": 2, "zero_stage": 2, "offload_optimizer": True}))
    hist, f = losses(tmp_path / "out"), lr_lambda("linear", 2, 6)
    assert json.loads((tmp_path / "out" / "layout.json").read_text())["deepspeed"]["optimizer"]["type"] == "AdamW"
    # the lr logged after optimizer step s is the schedule's value for step s
    assert [h["lr"] for h in hist] == pytest.approx([3e-3 * f(s) for s in range(1, 7)])
    assert hist[-1]["loss"] < hist[0]["loss"]


def test_parameter_offload_is_written_and_trains(local_ray, tmp_path, tiny_model, greeting_data):
    summary = run(job(tmp_path, tiny_model, greeting_data, max_steps=4, checkpoint_every=4,
                      plan={"workers": 2, "zero_stage": 3, "offload_optimizer": True, "offload_params": True}))
    zero = json.loads((tmp_path / "out" / "layout.json").read_text())["deepspeed"]["zero_optimization"]
    assert zero["offload_param"]["device"] == "cpu" and zero["offload_optimizer"]["device"] == "cpu"
    assert summary["metrics"]["step"] == 4 and (tmp_path / "out" / "final" / "adapter_model.safetensors").exists()


def poisoned_copy(model_dir, out_dir):
    """The model with one NaN in its final norm: every loss it computes is NaN."""
    import shutil

    shutil.copytree(model_dir, out_dir)
    model = AutoModelForCausalLM.from_pretrained(out_dir)
    with torch.no_grad():
        model.model.norm.weight[0] = float("nan")
    model.save_pretrained(out_dir)
    return out_dir


def stopped_with(spec, capsys) -> str:
    from gpufleet.jobs.finetune import main

    assert main([str(spec)]) == 1
    return capsys.readouterr().err


def test_nan_loss_stops_the_run_with_its_cause(local_ray, tmp_path, tiny_model, greeting_data, capsys):
    spec = job(tmp_path, poisoned_copy(tiny_model, tmp_path / "nan-model"), greeting_data, max_steps=6)
    err = stopped_with(spec, capsys)
    assert "NumericsError: loss is nan at step 1" in err and "kept in the job's output_dir" in err
    assert "loss is nan" in (tmp_path / "out" / "STOPPED_NUMERICS").read_text()


def test_all_labels_masked_stops_the_run_and_keeps_its_checkpoints(local_ray, tmp_path, tiny_model, capsys):
    long_prompts = tmp_path / "long.jsonl"
    long_prompts.write_text("".join(json.dumps({"prompt": "tell me " * 40, "completion": "ok"}) + "\n"
                                    for _ in range(32)))
    spec = job(tmp_path, tiny_model, long_prompts, max_steps=10, seq_len=16, checkpoint_every=1,
               stop_on_zero_loss_steps=3)
    err = stopped_with(spec, capsys)
    assert "every label is masked" in err and "prompts longer than seq_len" in err
    assert {p.name for p in (tmp_path / "out" / "ray" / "t").glob("step_*")} >= {"step_000001", "step_000002"}


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    from gpufleet.cluster.head import HeadConfig, free_port, start_head, stop_head

    d = tmp_path_factory.mktemp("head")
    state = start_head(HeadConfig(state_dir=d, num_cpus=4, dashboard_port=free_port()))
    yield d, state
    stop_head(d)


def test_ray_job_submit_end_to_end(head, tmp_path, tiny_model, greeting_data):
    _, state = head
    spec = job(tmp_path, tiny_model, greeting_data, max_steps=6, checkpoint_every=3)
    env = {**os.environ, **state.client_env()}
    p = subprocess.run([str(os.path.dirname(os.sys.executable)) + "/ray", "job", "submit", "--address",
                        state.dashboard_url, "--working-dir", os.getcwd(), "--", "python", "-m",
                        "gpufleet.jobs.finetune", str(spec)], env=env, capture_output=True, text=True, timeout=400)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "done: step 6/6" in p.stdout
    assert (tmp_path / "out" / "final" / "adapter_model.safetensors").exists()


def test_gpufleet_train_submits_and_follows_the_job(head, tmp_path, tiny_model, greeting_data):
    state_dir, _ = head
    spec = job(tmp_path, tiny_model, greeting_data, max_steps=4, checkpoint_every=2, output_dir="rel-out",
               publish="adapters", name="greeter")
    env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"} | {"GPUFLEET_HOME": str(state_dir)}
    p = subprocess.run([os.sys.executable, "-m", "gpufleet.cli", "train", str(spec)], env=env, capture_output=True,
                       text=True, timeout=400)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "SUCCEEDED" in p.stdout and "done: step 4/4" in p.stdout
    # relative paths in the spec resolve where it was submitted, not in the job's copy of the working dir
    final = tmp_path / "rel-out" / "final" / "adapter_model.safetensors"
    assert final.exists()
    # published into the adapter store a serve spec's adapters_dir names, with its version
    published = tmp_path / "adapters" / "greeter"
    assert "published: adapter greeter version" in p.stdout
    assert (published / "adapter_model.safetensors").read_bytes() == final.read_bytes()
    assert adapter_version(str(published)) == hashlib.sha256(final.read_bytes()).hexdigest()[:16]
