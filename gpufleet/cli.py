"""The `gpufleet` command line. Errors print one line on stderr and exit 1, never a traceback."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from functools import wraps
from typing import Any

import click
from rich.console import Console

from gpufleet.catalogue.errors import GpufleetError, SpecError, fix
from gpufleet.catalogue.gpus import GIB, get_gpu
from gpufleet.catalogue.memory import TrainSetup, estimate
from gpufleet.catalogue.model import load_model
from gpufleet.catalogue.planner import plan_request
from gpufleet.catalogue.plans import InferPlan, PlanRequest
from gpufleet.catalogue.table import CATALOGUE_GPUS, CATALOGUE_TASKS, build_catalogue
from gpufleet.cluster.head import HeadConfig
from gpufleet.cluster.kuberay import DEFAULT_IMAGE as KUBERAY_IMAGE
from gpufleet.demo import DemoOptions
from gpufleet.options import options_from, validated
from gpufleet.render import breakdown_table, catalogue_table, plan_table, print_error
from gpufleet.serve_apps.spec import ModelEntry

out = Console()
err = Console(stderr=True)


def one_line_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn gpufleet's own errors into one line on stderr and exit status 1."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except GpufleetError as e:
            print_error(err, str(e))
            sys.exit(1)

    return wrapper


def emit_json(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2, sort_keys=False))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="gpufleet")
def main() -> None:
    """gpufleet: plan, place, fine-tune and serve LLMs on a Ray GPU cluster."""


@main.command("plan")
@click.argument("model")
@options_from(PlanRequest, *(f for f in PlanRequest.model_fields if f != "enforce_eager"), names={"seq_len": "--seq"})
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
@click.option("--emit", type=click.Choice(["device-map", "transformerlens"]), help=(
    "generate: print only what to paste: device-map = {device_map, max_memory} for from_pretrained; "
    "transformerlens = n_devices and memory per GPU for HookedTransformer (float32 and bfloat16)."))
@one_line_errors
def plan_cmd(model: str, as_json: bool, emit: str | None, **request: Any) -> None:
    """Plan MODEL (a built-in name or a config.json path) for TASK on a GPU type."""
    p = plan_request(load_model(model), validated(PlanRequest, **request))
    if emit:
        emit_json(emitted(p, emit))
    elif as_json:
        emit_json(p.to_dict())
    else:
        out.print(plan_table(p))


def emitted(p: Any, what: str) -> Any:
    """The part of a generate plan a user pastes into transformers or TransformerLens."""
    if not isinstance(p, InferPlan) or p.split is None:
        raise SpecError(fix(f"--emit {what} is for generate plans", "add --task generate"))
    if what == "device-map":
        return p.split.emit()
    return [{"dtype": t.dtype, "n_devices": t.n_devices, "layers_per_gpu": t.layers_per_gpu,
             "weights_gib_per_gpu": [round(w / GIB, 2) for w in t.weights_per_gpu]} for t in p.transformerlens] or [
        {"error": f"no even TransformerLens split of {p.model} fits {p.gpus_per_node} x {p.gpu} in float32 or bfloat16"}]


@main.command("estimate")
@click.option("--config", "config", required=True, help="config.json path, model directory or built-in name.")
@options_from(TrainSetup, "task", "precision", "micro_batch", "seq_len", "new_tokens", "quant", "grad_ckpt", "lora_rank",
              names={"micro_batch": "--batch", "seq_len": "--seq"})
@click.option("--json", "as_json", is_flag=True)
@one_line_errors
def estimate_cmd(config: str, as_json: bool, **setup_fields: Any) -> None:
    """Peak GPU memory of one GPU running transformers: generate(), a labelled forward, or a
    fine-tuning step (torch AdamW)."""
    spec = load_model(config)
    setup = validated(TrainSetup, **setup_fields)
    mem = estimate(spec, setup)
    if as_json:
        emit_json({"model": spec.name, "params": spec.num_params, **setup.model_dump(), **mem.as_gib(),
                   "peak_bytes": mem.peak})
    else:
        out.print(spec.summary())
        out.print(breakdown_table(mem, f"{setup.task} {setup.precision} batch {setup.micro_batch} x {setup.seq_len}"
                                       f"{' +ckpt' if setup.grad_ckpt else ''}"))


@main.command("catalogue")
@click.option("--json", "as_json", is_flag=True)
@click.option("--gpu", "gpu_names", multiple=True, help="GPU types to show (repeatable).")
@one_line_errors
def catalogue_cmd(as_json: bool, gpu_names: tuple[str, ...]) -> None:
    """Built-in models x tasks x common GPUs -> GPU count, TP size, ZeRO stage."""
    gpus = [get_gpu(g).name for g in gpu_names] or list(CATALOGUE_GPUS)
    rows = build_catalogue(gpus)
    if as_json:
        emit_json(rows)
    else:
        out.print(catalogue_table(rows, gpus, list(CATALOGUE_TASKS)))


@main.command("up")
@click.option("--address", help="Attach to an existing cluster's GCS (host:port) instead of starting one.")
@click.option("--dashboard-url", help="With --address: the dashboard URL (default http://<host>:8265).")
@click.option("--cluster", "cluster_yaml", type=click.Path(), help="Validate a cluster.yaml and hand over to `ray up`.")
@options_from(HeadConfig, "host", "dashboard_port", "num_cpus", "num_gpus", "token_auth", "serve_proxy")
@click.option("--no-monitor", is_flag=True, help="Do not start the GPU metrics actors.")
@one_line_errors
def up_cmd(address: str | None, dashboard_url: str | None, cluster_yaml: str | None, no_monitor: bool,
           **head_fields: Any) -> None:
    """Start a local Ray head (or attach to one, or launch a cloud cluster)."""
    from gpufleet.cluster import head

    if cluster_yaml:
        import subprocess

        from gpufleet.cluster.launcher import validate_cluster_config
        from gpufleet.cluster.placement import record_node_types

        config = validate_cluster_config(cluster_yaml)
        kept = record_node_types(config)
        token = head.ensure_token()  # cluster.yaml's file_mounts copy it to every node
        out.print(f"{cluster_yaml}: valid; node types kept in {kept} for plan checks; token {token}; "
                  f"running `ray up -y {cluster_yaml}`")
        sys.exit(subprocess.call([head.ray_bin(), "up", "-y", cluster_yaml]))
    if address:
        host_part = address.rsplit(":", 1)[0]
        state = head.attach(address, dashboard_url or f"http://{host_part}:8265",
                            token_path=os.environ.get("RAY_AUTH_TOKEN_PATH"))
        head.connect(state)
        if not no_monitor:  # GPU metrics on every GPU node of the attached cluster, also ones that join later
            from gpufleet.cluster.monitor import ensure_monitoring

            ensure_monitoring()
        out.print(f"attached to {address}; `gpufleet down` will only forget it")
        return
    cfg = validated(HeadConfig, **head_fields)
    with out.status("starting the Ray head ..."):
        state = head.start_head(cfg)
    if not no_monitor:
        from gpufleet.cluster.monitor import ensure_monitoring

        head.connect(state)
        ensure_monitoring()
    out.print(f"[bold green]Ray head up[/] at {state.address}")
    out.print(f"  dashboard: {state.dashboard_url}   metrics: 127.0.0.1:{state.metrics_export_port}/metrics")
    out.print(f"  serve proxy: {'HAProxy' if state.serve_env else 'Ray Serve proxy'}")
    if state.token_path:
        out.print(f"  token: {state.token_path}  (clients: RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH={state.token_path})")
    out.print(f"  submit: ray job submit --address {state.dashboard_url} --working-dir . -- python -m gpufleet.jobs.finetune SPEC")


@main.command("proxy-env")
@options_from(HeadConfig, "serve_proxy")
@one_line_errors
def proxy_env_cmd(serve_proxy: str) -> None:
    """Print `export` lines that put this node's Ray processes in a Serve proxy mode, for the
    `ray start` of a node gpufleet does not start itself (cluster.yaml: eval "$(gpufleet proxy-env)")."""
    import shlex

    from gpufleet.cluster.head import serve_proxy_env

    for key, value in serve_proxy_env(serve_proxy).items():
        click.echo(f"export {key}={shlex.quote(value)}")


@main.command("down")
@one_line_errors
def down_cmd() -> None:
    """Stop the head `gpufleet up` started (only its own processes)."""
    from gpufleet.cluster.head import load_state, stop_head

    state = load_state()
    if state is None:
        out.print("no gpufleet head recorded; nothing to stop")
        return
    n = stop_head()
    out.print(f"stopped {n} processes of the head at {state.address}" if state.head_id
              else f"forgot the attached cluster at {state.address} (not stopped: gpufleet did not start it)")


@main.command("status")
@click.option("--json", "as_json", is_flag=True)
@one_line_errors
def status_cmd(as_json: bool) -> None:
    """Nodes, GPUs, placement groups, jobs, Serve apps and GPU metrics of the cluster."""
    from gpufleet.cluster.head import connect
    from gpufleet.cluster.status import collect_status
    from gpufleet.render import status_tables

    st = collect_status(connect())
    if as_json:
        emit_json(st.model_dump())
        return
    for t in status_tables(st):
        out.print(t)


@main.command("train")
@click.argument("spec", type=click.Path())
@click.option("--working-dir", default=".", show_default=True, help="Uploaded with the job (holds jobs/ and data).")
@click.option("--no-follow", is_flag=True, help="Submit and return the submission id.")
@click.option("--emit-config", is_flag=True, help="Print a KubeRay RayJob for this fine-tune instead of submitting.")
@click.option("--format", "fmt", type=click.Choice(["kuberay"]), default="kuberay", show_default=True,
              help="With --emit-config: the manifest to print.")
@click.option("--image", default=KUBERAY_IMAGE, show_default=True, help="With --format kuberay: the Ray image.")
@one_line_errors
def train_cmd(spec: str, working_dir: str, no_follow: bool, emit_config: bool, fmt: str, image: str) -> None:
    """Submit a fine-tune (LoRA, QLoRA or full) to the cluster and follow its progress."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    if emit_config:
        import yaml

        from gpufleet.jobs.submit import kuberay_job

        click.echo(yaml.safe_dump(kuberay_job(spec, image), sort_keys=False))
        return

    from gpufleet.cluster.head import load_state
    from gpufleet.jobs.submit import follow, submit

    head = load_state()
    if head is None:
        from gpufleet.catalogue.errors import GpufleetError

        raise GpufleetError("no gpufleet head is recorded. To fix: run `gpufleet up`")
    client, sid = submit(spec, head, working_dir)
    out.print(f"submitted [bold]{sid}[/]  (logs: ray job logs {sid} --address {head.dashboard_url})")
    if no_follow:
        return
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TextColumn("loss {task.fields[loss]}"), TimeRemainingColumn(), console=err) as bar:
        task = bar.add_task("training", total=None, loss="-")

        def on_step(step: int, total: int, loss: float) -> None:
            bar.update(task, completed=step, total=total, loss=f"{loss:.4f}")

        status = follow(client, sid, on_line=lambda line: None, on_step=on_step)
    logs = client.get_job_logs(sid).strip().splitlines()
    out.print("\n".join(line for line in logs if line.startswith(("done:", "error:")) or "checkpoints" in line))
    out.print(f"job {sid}: {status}")
    if status != "SUCCEEDED":
        sys.exit(1)


@main.command("serve")
@click.argument("spec_or_model")
@options_from(ModelEntry, "gpu", "context", "concurrency", "target_output_tokens_per_s")
@click.option("--emit-config", is_flag=True, help="Print a config instead of deploying (see --format).")
@click.option("--format", "fmt", type=click.Choice(["serve", "kuberay"]), default="serve", show_default=True,
              help="With --emit-config: serve = a Ray Serve config (`serve deploy`); kuberay = a RayService manifest.")
@click.option("--image", default=KUBERAY_IMAGE, show_default=True, help="With --format kuberay: the Ray image.")
@one_line_errors
def serve_cmd(spec_or_model: str, emit_config: bool, fmt: str, image: str, **entry_fields: Any) -> None:
    """Deploy the models of a serve spec (or one model by name) behind an OpenAI API."""
    from pathlib import Path

    import yaml

    from gpufleet.serve_apps.app import deploy, emit_kuberay
    from gpufleet.serve_apps.app import emit_config as emit
    from gpufleet.serve_apps.spec import ServeSpec, load_serve_spec

    if spec_or_model.endswith((".yaml", ".yml")):
        spec, base = load_serve_spec(spec_or_model)
    else:
        entry = validated(ModelEntry, id=spec_or_model.replace("/", "-"), source=spec_or_model, **entry_fields)
        spec, base = ServeSpec(models=[entry]), Path.cwd()
    if emit_config:
        manifest = emit_kuberay(spec, base, image) if fmt == "kuberay" else emit(spec, base)
        click.echo(yaml.safe_dump(manifest, sort_keys=False))
        return
    from gpufleet.cluster.head import connect

    connect()
    from gpufleet.serve_apps.app import haproxy_fronts_serve

    with out.status("deploying (vLLM replicas load the model) ..."):
        url = deploy(spec, base, report=out.print)
    haproxy = haproxy_fronts_serve()
    front = "HAProxy" if haproxy else "Ray Serve's proxy"
    layout = ("the replica serves the API itself" if spec.ingress_mode(haproxy) == "direct"
              else "through gpufleet's OpenAI router")
    out.print(f"[bold green]serving[/] {', '.join(m.id for m in spec.models)} at {url} ({front}, {layout})")
    out.print(f"  try: curl {url}/chat/completions -H 'Content-Type: application/json' -d "
              f"'{{\"model\": \"{spec.models[0].id}\", \"messages\": [{{\"role\": \"user\", \"content\": \"hi\"}}]}}'")


@main.command("demo")
@options_from(DemoOptions, *DemoOptions.model_fields)
def demo_cmd(**options: Any) -> None:
    """The whole story on a local cluster: plan, fine-tune, serve, answer (see README)."""
    from gpufleet.demo import run_demo

    sys.exit(run_demo(validated(DemoOptions, **options)))


if __name__ == "__main__":
    main()
