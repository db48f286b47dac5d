"""Job specs: bad input is rejected with the field and the fix, before anything is reserved."""


import pytest
import ray

from gpufleet.catalogue.errors import PlanError, SpecError
from gpufleet.catalogue.model import load_model
from gpufleet.jobs.data import load_conversations, tokenize
from gpufleet.jobs.finetune import prepare, run
from gpufleet.jobs.layout import deepspeed_config, resolve_layout
from gpufleet.jobs.spec import JobSpec, load_job_spec
from tests.conftest import write_spec


def spec_file(tmp_path, tiny_model, greeting_data, **over):
    fields = dict(model=str(tiny_model), dataset=str(greeting_data), max_steps=2, global_batch=2, seq_len=64)
    fields.update(over)
    return write_spec(tmp_path / "job.yaml", **fields)


def test_valid_spec_prepares_a_layout(tmp_path, tiny_model, greeting_data):
    spec, layout, cfg = prepare(spec_file(tmp_path, tiny_model, greeting_data))
    assert layout.workers == 2 and layout.dtype == "float32" and cfg["deepspeed"]["train_batch_size"] == 2


def test_unknown_key_is_named_with_the_known_ones(tmp_path, tiny_model, greeting_data):
    with pytest.raises(SpecError, match="unknown key 'learning_rat'.*learning_rate"):
        prepare(spec_file(tmp_path, tiny_model, greeting_data, learning_rat=0.1))


def test_missing_dataset_is_reported(tmp_path, tiny_model, greeting_data):
    with pytest.raises(SpecError, match="dataset .*nope.jsonl not found"):
        prepare(spec_file(tmp_path, tiny_model, greeting_data, dataset="nope.jsonl"))


def test_empty_dataset_is_reported(tmp_path, tiny_model, greeting_data):
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(SpecError, match="empty.jsonl is empty"):
        prepare(spec_file(tmp_path, tiny_model, greeting_data, dataset="empty.jsonl"))


def test_malformed_jsonl_line_is_reported_with_its_number(tmp_path, tiny_model, greeting_data):
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a", \n')
    with pytest.raises(SpecError, match=r"bad.jsonl:2: malformed JSON"):
        prepare(spec_file(tmp_path, tiny_model, greeting_data, dataset="bad.jsonl"))


def test_seq_len_above_model_maximum_is_refused(tmp_path, tiny_model, greeting_data):
    with pytest.raises(SpecError, match="seq_len=4096 exceeds the model's max_position_embeddings=2048"):
        prepare(spec_file(tmp_path, tiny_model, greeting_data, seq_len=4096))


def test_missing_model_directory_is_reported(tmp_path, tiny_model, greeting_data):
    with pytest.raises(SpecError, match="has no config.json"):
        prepare(spec_file(tmp_path, tiny_model, greeting_data, model=str(tmp_path)))


def test_negative_learning_rate_names_the_field(tmp_path, tiny_model, greeting_data):
    with pytest.raises(SpecError, match="learning_rate=-0.1"):
        prepare(spec_file(tmp_path, tiny_model, greeting_data, learning_rate=-0.1))


def test_steps_or_epochs_required():
    with pytest.raises(ValueError, match="neither epochs nor max_steps"):
        JobSpec(model="m", dataset="d")


def test_more_workers_than_the_cluster_can_hold_fails_fast(tmp_path, tiny_model, greeting_data):
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    try:
        with pytest.raises(PlanError, match=r"needs 8 CPU in all; the cluster can offer 2"):
            run(spec_file(tmp_path, tiny_model, greeting_data, global_batch=8, plan={"workers": 8}))
    finally:
        ray.shutdown()


def test_three_record_formats_become_the_same_chat(tmp_path):
    f = tmp_path / "mixed.jsonl"
    f.write_text('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}\n'
                 '{"prompt": "q", "completion": "a"}\n{"instruction": "q", "input": "", "output": "a"}\n')
    convs = load_conversations(f)
    assert convs[0] == convs[1] == convs[2]


def test_loss_only_on_assistant_tokens(tiny_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    ids, labels = tokenize([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}], tok)
    learned = tok.decode([i for i, lab in zip(ids, labels, strict=True) if lab != -100])
    assert learned.startswith("hello") and "hi" not in learned


def test_gpu_plan_drives_layout_and_fp16_on_t4():
    spec = JobSpec(model="m", dataset="d", task="full", max_steps=1, gpu="T4", global_batch=16, seq_len=1024)
    layout = resolve_layout(spec, load_model("qwen2.5-0.5b"))
    cfg = deepspeed_config(layout, spec)
    assert layout.dtype == "float16" and cfg["fp16"]["loss_scale"] == 0 and "bf16" not in cfg


def test_gpu_jobs_compile_by_default_and_cpu_jobs_do_not():
    cfg = load_model("llama-3.2-1b")
    gpu = JobSpec(model="m", dataset="d", task="full", max_steps=1, gpu="H100-80GB", global_batch=32, seq_len=2048)
    cpu = JobSpec(model="m", dataset="d", task="full", max_steps=1)
    assert resolve_layout(gpu, cfg).compile and not resolve_layout(cpu, cfg).compile


def test_compile_override_plans_for_eager_memory():
    """Turning compile off is planned with eager activations, which need more memory."""
    cfg = load_model("llama-3.2-1b")
    base = dict(model="m", dataset="d", task="full", max_steps=1, gpu="H100-80GB", global_batch=32, seq_len=2048)
    compiled = resolve_layout(JobSpec(**base), cfg)
    eager = resolve_layout(JobSpec(**base, plan={"compile": False}), cfg)
    assert not eager.compile and eager.predicted_peak_bytes > compiled.predicted_peak_bytes


def test_a_job_that_pins_offload_reserves_the_host_memory_it_will_use():
    """A layout override is planned, not patched on afterwards: its host memory is in the placement."""
    cfg = load_model("llama-3.2-3b")
    base = dict(model="m", dataset="d", task="full", max_steps=1, gpu="H100-80GB", global_batch=16, seq_len=2048)
    planned = resolve_layout(JobSpec(**base, plan={"workers": 2}), cfg)
    pinned = resolve_layout(JobSpec(**base, plan={"workers": 2, "zero_stage": 2, "offload_optimizer": True}), cfg)
    assert not planned.offload_optimizer and "memory" not in planned.placement.bundles[0]
    assert pinned.offload_optimizer and pinned.zero_stage == 2
    assert all(b["memory"] > 10 * 2**30 for b in pinned.placement.bundles)
    assert pinned.predicted_peak_bytes != planned.predicted_peak_bytes


def test_a_job_whose_pinned_layout_cannot_fit_is_refused_before_anything_is_reserved():
    spec = JobSpec(model="m", dataset="d", task="full", max_steps=1, gpu="H100-80GB", global_batch=8, seq_len=2048,
                   plan={"workers": 2, "zero_stage": 3, "offload_optimizer": False})
    with pytest.raises(PlanError, match=r"does not fit on 2 x H100-80GB with zero_stage=3, offload_optimizer=False"
                                        r".*drop those pins for the plan's own layout"):
        resolve_layout(spec, load_model("llama-3.1-8b"))


def test_a_job_pinned_to_float16_on_a_bf16_gpu_is_planned_and_run_in_float16():
    """plan.dtype is part of the plan, not patched on after it: the plan, the layout and DeepSpeed agree."""
    cfg = load_model("llama-3.2-1b")
    spec = JobSpec(model="m", dataset="d", task="full", max_steps=1, gpu="H100-80GB", global_batch=16,
                   seq_len=2048, plan={"dtype": "float16"})
    layout = resolve_layout(spec, cfg)
    assert layout.dtype == "float16" and "fp16" in deepspeed_config(layout, spec)


def test_a_float32_job_on_gpus_is_refused_before_anything_is_reserved():
    """The training memory model is of half-precision runs: an fp32 GPU layout would go out unchecked."""
    spec = JobSpec(model="m", dataset="d", task="lora", max_steps=1, gpu="H100-80GB", plan={"dtype": "float32"})
    with pytest.raises(PlanError, match="training in float32 on GPUs is not planned.*train on CPU workers"):
        resolve_layout(spec, load_model("llama-3.2-1b"))


def test_a_yaml_syntax_error_is_one_line_with_file_line_and_column(tmp_path):
    bad = tmp_path / "job.yaml"
    bad.write_text("name: x\nmodel: [unclosed\n")
    with pytest.raises(SpecError) as e:
        load_job_spec(bad)
    assert str(e.value).startswith(f"{bad}:3:1: not valid YAML (") and "\n" not in str(e.value)


def test_an_unknown_nested_key_is_answered_with_its_own_sections_fields(tmp_path, tiny_model, greeting_data):
    spec = write_spec(tmp_path / "job.yaml", model=str(tiny_model), dataset=str(greeting_data), max_steps=1,
                      lora={"rr": 8})
    with pytest.raises(SpecError, match=r"unknown key 'lora.rr'. To fix: remove it or use one of: r, alpha, dropout, "
                                        r"target_modules$"):
        load_job_spec(spec)


def test_publishing_a_full_fine_tune_is_refused_with_the_fix(tmp_path):
    from gpufleet.catalogue.errors import SpecError
    from gpufleet.jobs.spec import load_job_spec

    spec = tmp_path / "job.yaml"
    spec.write_text("model: llama-3.2-1b\ndataset: d.jsonl\ntask: full\nmax_steps: 1\npublish: adapters\n")
    with pytest.raises(SpecError, match="publish: is for LoRA / QLoRA adapters"):
        load_job_spec(spec)
