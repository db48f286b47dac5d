"""gpufleet as software others install: a wheel that works outside the repo, the node image, the GPU examples."""

from __future__ import annotations

import re
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from gpufleet.cli import main
from gpufleet.cluster.image import base_image, node_pins

ROOT = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    had_build = (ROOT / "build").exists()
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
                    str(ROOT)], check=True, capture_output=True, timeout=300)
    if not had_build:  # setuptools builds in the source tree: leave the checkout as it was
        import shutil

        shutil.rmtree(ROOT / "build", ignore_errors=True)
    (found,) = out.glob("gpufleet-*.whl")
    return found


def test_the_wheel_holds_one_gpufleet_namespace_and_no_top_level_catalogue(wheel):
    import zipfile

    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"gpufleet"}
    assert "gpufleet/catalogue/models/llama-3.1-8b.json" in names and "gpufleet/jobs/finetune.py" in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)


def test_the_wheel_plans_in_a_fresh_virtualenv_outside_the_repo(wheel, tmp_path):
    """Installed with --no-deps into a new venv that borrows this one's dependencies (no network here), run from
    a folder that is not the repo: it must use the wheel's files, not the checkout's."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    # a plain path line: .pth files in the borrowed folder (this checkout's editable finder) are not run
    (Path(site) / "borrowed-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True,
                   capture_output=True, timeout=300)
    run = subprocess.run([str(venv / "bin" / "gpufleet"), "plan", "llama-3.1-8b", "--task", "serve", "--gpu",
                          "H100-80GB", "--json"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert yaml.safe_load(run.stdout)["gpus"] == 1
    where = subprocess.run([str(py), "-c", "import gpufleet.catalogue.planner as p; print(p.__file__)"], cwd=tmp_path,
                           capture_output=True, text=True, check=True).stdout
    assert where.startswith(site) and str(ROOT) not in where
    version = subprocess.run([str(venv / "bin" / "gpufleet"), "--version"], capture_output=True, text=True).stdout
    assert re.search(r"version \d+\.\d+\.\d+", version)


def test_the_node_image_builds_on_the_pinned_ray_llm_image_and_installs_the_wheel_built_here():
    text = (ROOT / "Dockerfile").read_text()
    arg = re.search(r"^ARG RAY_VERSION=(\S+)$", text, re.M).group(1)
    assert arg == node_pins()["ray"]
    assert "FROM rayproject/ray-llm:${RAY_VERSION}-py311-cu128" in text
    assert base_image() == f"rayproject/ray-llm:{arg}-py311-cu128"
    assert "python -m build --wheel" in text and "COPY . /src" in text  # the package built from this repo
    assert re.search(r'pip install .*gpufleet-\*\.whl\)\[node,vllm\]', text)
    assert {"ray", "vllm", "torch", "deepspeed"} <= set(node_pins())


def test_the_shipped_cluster_file_accepts_the_showcase_offload_fine_tune():
    r = CliRunner().invoke(main, ["plan", "llama-3.1-8b", "--task", "full", "--gpu", "H100-80GB", "--cluster",
                                  str(ROOT / "cluster.yaml")])
    assert r.exit_code == 0, r.output
    assert "h100x8" in r.output


def test_a_plan_no_node_type_of_the_cluster_file_can_hold_is_refused_in_one_line(tmp_path):
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    config["available_node_types"] = {k: v for k, v in config["available_node_types"].items()
                                      if not k.startswith("h100")}
    (tmp_path / "no-h100.yaml").write_text(yaml.safe_dump(config))
    r = CliRunner().invoke(main, ["plan", "llama-3.1-8b", "--task", "serve", "--gpu", "H100-80GB", "--cluster",
                                  str(tmp_path / "no-h100.yaml")])
    assert r.exit_code == 1 and "can never be placed" in r.output and len(r.output.strip().splitlines()) == 1


@pytest.mark.parametrize("example", sorted((ROOT / "examples" / "gpu").glob("*.yaml")), ids=lambda p: p.stem)
def test_each_gpu_example_is_planned(example, tmp_path, monkeypatch):
    """The README's GPU quickstart specs: valid, and planned for their GPU (a repo id plans from the Hub's
    config.json, here from a cache holding the built-in's copy)."""
    from gpufleet.catalogue.model import builtin_models
    from gpufleet.catalogue.sources import model_source
    from gpufleet.jobs.layout import resolve_layout
    from gpufleet.jobs.spec import load_job_spec
    from gpufleet.serve_apps.app import sourced_plan
    from gpufleet.serve_apps.spec import load_serve_spec
    from tests.conftest import go_offline, hf_cache_with

    hf_cache_with(tmp_path, "Qwen/Qwen2.5-7B", {"config.json": builtin_models()["qwen2.5-7b"].read_text()})
    go_offline(monkeypatch, tmp_path)
    if "serve" in example.stem:
        spec, base = load_serve_spec(example)
        assert all(sourced_plan(m, base)[1].gpus >= 1 for m in spec.models)
        return
    spec, base = load_job_spec(example)
    from gpufleet.catalogue.model import spec_from_config

    layout = resolve_layout(spec, spec_from_config(model_source(spec.model, base, "model")[1], name=spec.model))
    assert layout.use_gpu and layout.workers >= 1


def quickstart_commands() -> list[str]:
    """The `gpufleet ...` lines of the README's GPU quickstart that need no cluster (plans and manifests)."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## GPU quickstart"):]
    section = section[:section.index("\n## ", 4)]
    lines = [line.split("#")[0].split("|")[0].strip() for line in section.splitlines()]
    return [line for line in lines if line.startswith("gpufleet ") and ("--emit-config" in line or " plan " in line)]


@pytest.mark.parametrize("command", quickstart_commands())
def test_the_readme_quickstart_commands_that_need_no_cluster_run(command, tmp_path, monkeypatch):
    import shlex

    from gpufleet.catalogue.model import builtin_models
    from tests.conftest import go_offline, hf_cache_with

    hf_cache_with(tmp_path, "Qwen/Qwen2.5-7B", {"config.json": builtin_models()["qwen2.5-7b"].read_text()})
    go_offline(monkeypatch, tmp_path)
    monkeypatch.chdir(ROOT)
    r = CliRunner().invoke(main, shlex.split(command)[1:])
    assert r.exit_code == 0, r.output
    if "--emit-config" in command:
        docs = list(yaml.safe_load_all(r.stdout))  # stdout is the manifest alone: it is piped to kubectl
        assert docs[-1]["kind"] in ("RayJob", "RayService") and str(ROOT) not in r.stdout


def test_a_plan_against_the_cluster_file_takes_its_node_shape():
    args = ["plan", "llama-3.1-70b", "--task", "serve", "--gpu", "A10G", "--json"]
    on_file = CliRunner().invoke(main, [*args, "--cluster", str(ROOT / "cluster.yaml")])
    assert on_file.exit_code == 0, on_file.output
    shaped = yaml.safe_load(on_file.stdout)
    assert (shaped["tensor_parallel"], shaped["pipeline_parallel"], shaped["gpus_per_node"]) == (4, 2, 4)
    assert yaml.safe_load(CliRunner().invoke(main, args).stdout)["tensor_parallel"] == 8  # no file: 8-GPU nodes
