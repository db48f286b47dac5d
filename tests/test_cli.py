"""The gpufleet CLI contract: JSON output other tools parse, one-line errors, exit codes."""

import json
import os
import subprocess
import sys

from click.testing import CliRunner

from gpufleet.cli import main

runner = CliRunner()


def test_estimate_json_has_peak_gib_and_breakdown():
    r = runner.invoke(main, ["estimate", "--config", "catalogue/models/llama-3.1-8b.json", "--task", "lora",
                             "--dtype", "bfloat16", "--micro-batch", "1", "--seq-len", "1024", "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    assert 24 < d["peak_gib"] < 28 and {"weights_gib", "activations_gib", "logits_and_loss_gib"} <= set(d)


def test_plan_json_contains_bundles_and_tp():
    r = runner.invoke(main, ["plan", "llama-3.1-70b", "--task", "serve", "--gpu", "H100-80GB", "--json"])
    d = json.loads(r.output)
    assert d["tensor_parallel"] == 4 and len(d["placement"]["bundles"]) == 4


def test_training_plan_assumes_torch_compile_unless_told_not_to():
    args = ["plan", "llama-3.2-1b", "--task", "full", "--gpu", "H100-80GB", "--seq-len", "2048", "--global-batch", "32", "--json"]
    compiled = json.loads(runner.invoke(main, args).output)
    eager = json.loads(runner.invoke(main, [*args, "--no-compile"]).output)
    assert compiled["compile"] is True and eager["compile"] is False
    assert eager["memory_gib"]["peak_gib"] > compiled["memory_gib"]["peak_gib"]


def test_catalogue_json_lists_every_builtin_model():
    d = json.loads(runner.invoke(main, ["catalogue", "--json", "--gpu", "H100"]).output)
    assert len(d) >= 20 and d[0]["plans"]["H100-80GB"]["serve"]["gpus"] == 1


def test_errors_are_one_line_on_stderr_with_nonzero_exit():
    p = subprocess.run([sys.executable, "-m", "gpufleet.cli", "plan", "llama-3.1-70b", "--task", "serve",
                        "--gpu", "A10G", "--gpus", "2"], capture_output=True, text=True)
    assert p.returncode == 1 and p.stdout == ""
    assert p.stderr.startswith("error:") and "To fix:" in p.stderr and "Traceback" not in p.stderr


def test_bad_estimate_value_names_the_field():
    r = runner.invoke(main, ["estimate", "--config", "qwen2.5-0.5b", "--task", "full", "--micro-batch", "0"])
    assert r.exit_code == 1 and "--micro-batch=0" in r.output


def test_a_missing_required_option_is_named_by_its_flag_not_a_class():
    r = CliRunner().invoke(main, ["plan", "llama-3.1-8b", "--task", "lora"])
    assert r.exit_code == 2 and "Missing option '--gpu'" in r.output and "PlanRequest" not in r.output


def test_an_option_that_does_not_apply_to_the_task_is_refused_by_its_flag():
    r = CliRunner().invoke(main, ["plan", "llama-3.1-8b", "--task", "lora", "--gpu", "A10G", "--new-tokens", "64"])
    assert r.exit_code == 1
    assert r.output.strip() == ("error: new_tokens (--new-tokens) applies to task generate, not to 'lora'. "
                                "To fix: drop it, or plan that task")
    bad = CliRunner().invoke(main, ["plan", "llama-3.1-8b", "--task", "lora", "--gpu", "A10G", "--headroom", "2"])
    assert bad.exit_code == 1 and bad.output.startswith("error: --headroom=2.0:") and "PlanRequest" not in bad.output


def test_model_names_are_case_insensitive_and_a_near_miss_is_answered_with_the_name():
    assert json.loads(runner.invoke(main, ["plan", "Llama-3.1-8B", "--task", "serve", "--gpu", "h100", "--json"]
                                    ).output)["model"] == "llama-3.1-8b"
    r = runner.invoke(main, ["plan", "llama-3.1-8", "--task", "serve", "--gpu", "H100"])
    assert r.exit_code == 1 and r.output.strip().endswith("To fix: did you mean llama-3.1-8b?")


def test_a_former_flag_still_works_with_a_one_line_notice():
    r = CliRunner().invoke(main, ["estimate", "--config", "llama-3.2-1b", "--task", "full", "--seq", "4096", "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["seq_len"] == 4096
    assert r.stderr.strip() == "notice: --seq is now --seq-len; --seq is accepted until gpufleet 0.2"


def test_a_former_spec_key_still_works_with_a_one_line_notice(capsys):
    from gpufleet.serve_apps.spec import ModelEntry

    assert ModelEntry(id="m", source="llama-3.2-1b", context=512).max_model_len == 512
    assert "'context' is now 'max_model_len'" in capsys.readouterr().err


def test_former_batch_flag_is_the_tasks_own_name_with_a_notice():
    args = ["plan", "llama-3.1-70b", "--task", "serve", "--gpu", "H100", "--json"]
    r = runner.invoke(main, [*args, "--batch", "64"])
    assert r.exit_code == 0, r.output
    assert "notice: --batch is now --concurrency" in r.stderr
    assert r.stdout == runner.invoke(main, [*args, "--concurrency", "64"]).stdout != runner.invoke(main, args).stdout


def test_former_precision_flag_and_values_still_work_with_a_notice():
    r = runner.invoke(main, ["estimate", "--config", "qwen2.5-0.5b", "--task", "lora", "--precision", "fp16", "--json"])
    assert r.exit_code == 0, r.output
    assert "notice: --precision is now --dtype" in r.stderr and json.loads(r.stdout)["dtype"] == "float16"


def test_a_quiet_terminal_sends_library_output_to_the_log_and_keeps_gpufleets_own(tmp_path):
    code = """
import logging, sys
from rich.console import Console
from gpufleet.terminal import quiet_terminal
out, err = Console(), Console(stderr=True)
quiet_terminal([out, err], "t")
logging.basicConfig()
logging.getLogger("ray.serve").warning("a library line")
print("printed by a library")
out.print("gpufleet says hi")
raise ValueError("boom")
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={**os.environ, "GPUFLEET_HOME": str(tmp_path)})
    assert p.stdout == "gpufleet says hi\n"
    log = next((tmp_path / "logs").glob("t-*.log"))
    assert p.stderr.splitlines() == [f"library logs: {log} (-v shows them here)",
                                     f"error: ValueError: boom (traceback in {log})"]
    text = log.read_text()
    assert "a library line" in text and "printed by a library" in text and "Traceback" in text


def test_an_error_naming_a_model_entry_keeps_its_brackets(tmp_path):
    spec = tmp_path / "serve.yaml"
    spec.write_text("models:\n  - {id: chat, source: llama-3.2-1b, gpu: H100, slo: {ttft_p50_ms: 200}}\n")
    r = runner.invoke(main, ["serve", str(spec), "--emit-config"])
    assert r.exit_code == 1 and "models[chat].slo scales replicas" in r.output
