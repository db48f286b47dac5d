"""The `gpufleet` command line. Errors print one line on stderr and exit 1, never a traceback."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
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
from gpufleet.cluster.endpoint import ADDRESS_HELP
from gpufleet.cluster.head import HeadConfig
from gpufleet.cluster.image import default_image
from gpufleet.cluster.kuberay import PodSecrets
from gpufleet.demo import DemoOptions
from gpufleet.options import notice_renamed, options_from, renamed, validated, with_renamed
from gpufleet.render import apps_table, breakdown_table, catalogue_table, jobs_table, plan_table, print_error
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


# Options whose flag is not the field's name.
PLAN_FLAGS: dict[str, str] = {}
# `plan --batch` meant a different thing per task; each now has its own name.
BATCH_BY_TASK = {"lora": "global_batch", "qlora": "global_batch", "full": "global_batch", "serve": "concurrency",
                 "generate": "micro_batch", "infer": "micro_batch"}
address_option = click.option("--address", default=None, help=ADDRESS_HELP)
image_option = click.option("--image", default=None, help=(
    "With --format kuberay: the node image (default: the gpufleet image of this version, `make image`)."))


def emit_json(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2, sort_keys=False))


def show_rows(rows: list[dict[str, Any]], as_json: bool, table: Callable[[list[dict[str, Any]]], Any]) -> None:
    """A listing: the rows as JSON for scripts, else the table drawn from them."""
    if as_json:
        emit_json(rows)
    else:
        out.print(table(rows))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="gpufleet")
@click.option("-v", "--verbose", is_flag=True, help=(
    "Show the log lines of Ray, vLLM and DeepSpeed here; by default up, train, serve and demo write them to "
    "a log file under GPUFLEET_HOME/logs and print its path once."))
def main(verbose: bool) -> None:
    """gpufleet: plan, place, fine-tune and serve LLMs on a Ray GPU cluster."""


def quiet_unless_verbose(command: str, *consoles: Console) -> None:
    """Library log lines to a log file for the rest of this command, unless ``gpufleet -v`` (or the command
    runs inside another program that took over stdout, such as click's test runner)."""
    if sys.stdout is sys.__stdout__ and not click.get_current_context().find_root().params.get("verbose"):
        from gpufleet.terminal import quiet_terminal

        quiet_terminal([out, err, *consoles], command)


@main.command("plan")
@click.argument("model")
@options_from(PlanRequest, *(f for f in PlanRequest.model_fields if f != "enforce_eager"), names=PLAN_FLAGS)
@renamed("--seq", "seq_len", "--seq-len")
@renamed("--quant", "quantization", "--quantization", kind=str)
@click.option("--batch", "former_batch", type=int, hidden=True,
              help="Former name of --global-batch (training), --concurrency (serve), --micro-batch (generate).")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
@click.option("--emit", type=click.Choice(["device-map", "transformerlens"]), help=(
    "generate: print only what to paste: device-map = {device_map, max_memory} for from_pretrained; "
    "transformerlens = n_devices and memory per GPU for HookedTransformer (float32 and bfloat16)."))
@click.option("--cluster", "cluster_yaml", type=click.Path(), help=(
    "A Ray cluster-launcher file (cluster.yaml): refuse the plan unless one of its node types can hold it, "
    "as submission does."))
@one_line_errors
def plan_cmd(model: str, as_json: bool, emit: str | None, cluster_yaml: str | None, former_batch: int | None,
             **request: Any) -> None:
    """Plan MODEL (a built-in name or a config.json path) for TASK on a GPU type."""
    if former_batch is not None:
        field = BATCH_BY_TASK[request["task"]]
        notice_renamed("--batch", "--" + field.replace("_", "-"))
        request[field] = request[field] or former_batch
    types = None
    if cluster_yaml:
        from gpufleet.catalogue.placement import largest_node_gpus, node_types_from_cluster_config
        from gpufleet.cluster.launcher import validate_cluster_config

        types = node_types_from_cluster_config(validate_cluster_config(cluster_yaml))
        gpu = request["gpu"]
        if request["gpus_per_node"] == PlanRequest.model_fields["gpus_per_node"].default and gpu.upper() != "CPU":
            # the file's node shape for this GPU type, unless --gpus-per-node says otherwise
            request["gpus_per_node"] = largest_node_gpus(get_gpu(gpu).ray_accelerator_type, types) or \
                request["gpus_per_node"]
    p = plan_request(load_model(model), validated(PlanRequest, PLAN_FLAGS, **with_renamed(request)))
    if types is not None:
        from gpufleet.catalogue.placement import check_feasible

        check_feasible(p.placement.bundles, p.placement.strategy, [], types)
        err.print(f"{cluster_yaml}: node types {', '.join(t.name for t in types if any(t.holds(b) for b in p.placement.bundles))} "
                  "can hold this plan's bundles", markup=False, highlight=False)
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
@options_from(TrainSetup, "task", "dtype", "micro_batch", "seq_len", "new_tokens", "quantization", "grad_ckpt", "lora_rank")
@renamed("--seq", "seq_len", "--seq-len")
@renamed("--batch", "micro_batch", "--micro-batch")
@renamed("--precision", "dtype", "--dtype", kind=str, values={"bf16": "bfloat16", "fp16": "float16"})
@renamed("--quant", "quantization", "--quantization", kind=str)
@click.option("--json", "as_json", is_flag=True)
@one_line_errors
def estimate_cmd(config: str, as_json: bool, **setup_fields: Any) -> None:
    """Peak GPU memory of one GPU running transformers: generate(), a labelled forward, or a
    fine-tuning step (torch AdamW)."""
    spec = load_model(config)
    setup = validated(TrainSetup, **with_renamed(setup_fields))
    mem = estimate(spec, setup)
    if as_json:
        emit_json({"model": spec.name, "params": spec.num_params, **setup.model_dump(), **mem.as_gib(),
                   "peak_bytes": mem.peak})
    else:
        out.print(spec.summary())
        out.print(breakdown_table(mem, f"{setup.task} {setup.dtype} {setup.micro_batch} x {setup.seq_len}"
                                       f"{' +ckpt' if setup.grad_ckpt else ''}"))


@main.command("catalogue")
@click.option("--json", "as_json", is_flag=True)
@click.option("--gpu", "gpu_names", multiple=True, help="GPU types to show (repeatable).")
@one_line_errors
def catalogue_cmd(as_json: bool, gpu_names: tuple[str, ...]) -> None:
    """Built-in models x tasks x common GPUs -> GPU count, TP size, ZeRO stage."""
    gpus = [get_gpu(g).name for g in gpu_names] or list(CATALOGUE_GPUS)
    rows = build_catalogue(gpus)
    show_rows(rows, as_json, lambda r: catalogue_table(r, gpus, list(CATALOGUE_TASKS)))


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
    quiet_unless_verbose("up")
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
    out.print(f"  submit: gpufleet train SPEC   (or RAY_ADDRESS={state.dashboard_url} gpufleet train SPEC elsewhere)")


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
@address_option
@click.option("--json", "as_json", is_flag=True)
@one_line_errors
def status_cmd(address: str | None, as_json: bool) -> None:
    """Nodes, GPUs, placement groups, jobs, Serve apps and GPU metrics of the cluster."""
    from gpufleet.cluster.endpoint import from_head, resolve_endpoint
    from gpufleet.cluster.head import connect
    from gpufleet.cluster.status import collect_status, remote_status
    from gpufleet.render import status_tables

    endpoint = resolve_endpoint(address)
    if endpoint.shares_disk:
        head = connect()
        st = collect_status(from_head(head), head.address)
    else:
        with err.status("collecting the cluster's status through a job ..."):
            st = remote_status(endpoint)
    if as_json:
        emit_json(st.model_dump())
        return
    for t in status_tables(st):
        out.print(t)


@main.command("train")
@click.argument("spec", type=click.Path())
@address_option
@click.option("--no-follow", is_flag=True, help="Submit and return the submission id.")
@click.option("--quiet", is_flag=True, help="While following: only the progress bar, not the job's log lines.")
@click.option("--emit-config", is_flag=True, help="Print a KubeRay RayJob (and its ConfigMap) instead of submitting.")
@click.option("--format", "fmt", type=click.Choice(["kuberay"]), default="kuberay", show_default=True,
              help="With --emit-config: the manifest to print.")
@image_option
@options_from(PodSecrets, *PodSecrets.model_fields)
@one_line_errors
def train_cmd(spec: str, address: str | None, no_follow: bool, quiet: bool, emit_config: bool, fmt: str,
              image: str | None, **secrets: Any) -> None:
    """Submit a fine-tune (LoRA, QLoRA or full) to the cluster and follow its progress."""
    if emit_config:
        import yaml

        from gpufleet.jobs.submit import kuberay_job

        click.echo(yaml.safe_dump_all(kuberay_job(spec, image or default_image(), validated(PodSecrets, **secrets)),
                                      sort_keys=False))
        return
    from gpufleet.cluster.endpoint import resolve_endpoint
    from gpufleet.jobs.spec import load_job_spec
    from gpufleet.jobs.submit import submit

    load_job_spec(spec)  # a bad spec is named before a missing cluster is
    endpoint = resolve_endpoint(address)
    quiet_unless_verbose("train")
    client, sid, _ = submit(spec, endpoint)
    out.print(f"submitted [bold]{sid}[/] to {endpoint.dashboard_url}")
    if no_follow:
        out.print(f"  follow: gpufleet jobs follow {sid}   logs: gpufleet jobs logs {sid}   stop: gpufleet jobs stop {sid}")
        return
    follow_job(client, sid, quiet)


def follow_job(client: Any, sid: str, quiet: bool) -> None:
    """Stream a job's log lines under a progress bar fed by its step lines; exit 1 unless it succeeded.
    Ctrl-C stops following, never the job."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from gpufleet.jobs.submit import follow

    kept: list[str] = []
    try:
        with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                      TextColumn("loss {task.fields[loss]}"), TimeRemainingColumn(), console=err) as bar:
            task = bar.add_task(sid, total=None, loss="-")

            def on_line(line: str) -> None:
                if line.startswith(("done:", "published:", "error:")):
                    kept.append(line)
                if not quiet:
                    bar.console.print(line, markup=False, highlight=False, soft_wrap=True)

            def on_step(step: int, total: int, loss: float) -> None:
                bar.update(task, completed=step, total=total, loss=f"{loss:.4f}")

            status = follow(client, sid, on_line=on_line, on_step=on_step)
    except KeyboardInterrupt:
        err.print(f"stopped following; job {sid} goes on (gpufleet jobs follow {sid} | gpufleet jobs stop {sid})")
        sys.exit(130)
    if kept:  # the job's last word, also where its log went to stderr
        out.print("\n".join(kept), markup=False, highlight=False)
    out.print(f"job {sid}: {status}")
    if status != "SUCCEEDED":
        sys.exit(1)


@main.group("jobs")
def jobs_group() -> None:
    """List, follow, read and stop the cluster's jobs (Ray's Job Submission API)."""


def job_call(address: str | None, what: str, sid: str | None = None) -> tuple[Any, Any]:
    """(client, result of ``what`` on it): Ray's errors (an unknown id, an unreachable head) in one line."""
    from gpufleet.cluster.endpoint import resolve_endpoint

    client = resolve_endpoint(address).job_client()
    try:
        return client, getattr(client, what)(*([sid] if sid else []))
    except RuntimeError as e:
        first = (str(e).strip().splitlines() or [""])[0]
        raise GpufleetError(fix(f"{what.replace('_', ' ')} {sid or ''}: {first}".replace("  ", " "),
                                "see `gpufleet jobs list` for the submission ids")) from None


@jobs_group.command("list")
@address_option
@click.option("--json", "as_json", is_flag=True)
@one_line_errors
def jobs_list_cmd(address: str | None, as_json: bool) -> None:
    """Every job the cluster knows, newest first."""
    _, jobs = job_call(address, "list_jobs")
    rows = sorted(({"submission_id": j.submission_id, "status": str(j.status.value), "name": (j.metadata or {}).get(
        "name", ""), "kind": (j.metadata or {}).get("gpufleet", ""), "start_time": j.start_time,
        "entrypoint": j.entrypoint} for j in jobs), key=lambda r: r["start_time"] or 0, reverse=True)
    show_rows(rows, as_json, jobs_table)


@jobs_group.command("logs")
@click.argument("submission_id")
@address_option
@one_line_errors
def jobs_logs_cmd(submission_id: str, address: str | None) -> None:
    """Print a job's whole log so far."""
    click.echo(job_call(address, "get_job_logs", submission_id)[1], nl=False)


@jobs_group.command("follow")
@click.argument("submission_id")
@address_option
@click.option("--quiet", is_flag=True, help="Only the progress bar, not the job's log lines.")
@one_line_errors
def jobs_follow_cmd(submission_id: str, address: str | None, quiet: bool) -> None:
    """Follow a job again (its log from the start, then live) until it ends."""
    client, _ = job_call(address, "get_job_status", submission_id)
    follow_job(client, submission_id, quiet)


@jobs_group.command("stop")
@click.argument("submission_id")
@address_option
@one_line_errors
def jobs_stop_cmd(submission_id: str, address: str | None) -> None:
    """Stop a running job (its checkpoints and logs stay where the job wrote them)."""
    from gpufleet.cluster.endpoint import wait_for_end

    client, stopped = job_call(address, "stop_job", submission_id)
    status = wait_for_end(client, submission_id, 60)
    out.print(f"job {submission_id}: {status}" + ("" if stopped else " (it had already ended)"))


@main.group("apps")
def apps_group() -> None:
    """List and delete the cluster's Serve apps."""


@apps_group.command("list")
@address_option
@click.option("--json", "as_json", is_flag=True)
@one_line_errors
def apps_list_cmd(address: str | None, as_json: bool) -> None:
    """Serve apps, their status and deployments."""
    from gpufleet.cluster.endpoint import resolve_endpoint, serve_applications

    apps = serve_applications(resolve_endpoint(address))
    rows = [{"name": name, "status": a.get("status", ""), "route_prefix": a.get("route_prefix"),
             "deployments": {d: v.get("status", "") for d, v in (a.get("deployments") or {}).items()},
             "message": a.get("message", "")} for name, a in apps.items()]
    show_rows(rows, as_json, apps_table)


@apps_group.command("delete")
@click.argument("name")
@address_option
@one_line_errors
def apps_delete_cmd(name: str, address: str | None) -> None:
    """Delete one Serve app (its replicas and their GPUs are released; other apps keep running)."""
    from gpufleet.cluster.endpoint import resolve_endpoint, serve_applications

    endpoint = resolve_endpoint(address)
    apps = serve_applications(endpoint)
    if name not in apps:
        raise GpufleetError(fix(f"no serve app named {name} on {endpoint.dashboard_url}",
                                f"pick one of: {', '.join(apps) or '(none running)'}"))
    with out.status(f"deleting {name} ..."):
        sid, status, logs = endpoint.run_short_job(f"python -m gpufleet.serve_apps.remote delete {name}",
                                                   {"gpufleet": "apps-delete", "name": name}, timeout_s=600)
    if status != "SUCCEEDED":
        raise GpufleetError(fix(f"deleting {name} ended {status}: {logs.strip()[-300:]}",
                                f"see `gpufleet jobs logs {sid}`"))
    out.print(f"deleted serve app {name}")


@main.command("serve")
@click.argument("spec_or_model")
@options_from(ModelEntry, "gpu", "max_model_len", "concurrency", "target_output_tokens_per_s", "objective")
@renamed("--context", "max_model_len", "--max-model-len")
@address_option
@click.option("--emit-config", is_flag=True, help="Print a config instead of deploying (see --format).")
@click.option("--format", "fmt", type=click.Choice(["serve", "kuberay"]), default="serve", show_default=True,
              help="With --emit-config: serve = a Ray Serve config (`serve deploy`); kuberay = a RayService manifest.")
@image_option
@options_from(PodSecrets, *PodSecrets.model_fields)
@one_line_errors
def serve_cmd(spec_or_model: str, address: str | None, emit_config: bool, fmt: str, image: str | None,
              hf_token_secret: str, storage_secret: str, **entry_fields: Any) -> None:
    """Deploy the models of a serve spec (or one model by name) behind an OpenAI API."""
    entry_fields = with_renamed(entry_fields)

    import yaml

    from gpufleet.serve_apps.spec import ServeSpec, load_serve_spec

    if spec_or_model.endswith((".yaml", ".yml")):
        spec, base = load_serve_spec(spec_or_model)
    else:
        entry = validated(ModelEntry, id=spec_or_model.strip("/").replace("/", "-"), source=spec_or_model, **entry_fields)
        spec, base = ServeSpec(models=[entry]), Path.cwd()
    if emit_config:
        from gpufleet.serve_apps.app import emit_config as emit
        from gpufleet.serve_apps.app import emit_kuberay

        secrets = validated(PodSecrets, hf_token_secret=hf_token_secret, storage_secret=storage_secret)
        with err.status("checking the config with Ray Serve LLM (imports vLLM) ..."):
            manifest = (emit_kuberay(spec, base, image or default_image(), secrets) if fmt == "kuberay"
                        else emit(spec, base))
        click.echo(yaml.safe_dump(manifest, sort_keys=False))
        return
    from gpufleet.cluster.endpoint import resolve_endpoint

    endpoint = resolve_endpoint(address)
    quiet_unless_verbose("serve")
    if not endpoint.shares_disk:
        serve_remote(spec, base, endpoint)
        return
    from gpufleet.cluster.head import connect
    from gpufleet.serve_apps.app import deploy, haproxy_fronts_serve
    from gpufleet.serve_apps.remote import replica_env

    connect()
    with out.status("deploying (vLLM replicas load the model) ..."):
        url = deploy(spec, base, report=out.print, env=replica_env(spec))
    haproxy = haproxy_fronts_serve()
    front = "HAProxy" if haproxy else "Ray Serve's proxy"
    layout = ("the replica serves the API itself" if spec.ingress_mode(haproxy) == "direct"
              else "through gpufleet's OpenAI router")
    out.print(f"[bold green]serving[/] {', '.join(m.id for m in spec.models)} at {url} ({front}, {layout})")
    out.print(f"  try: curl {url}/chat/completions -H 'Content-Type: application/json' -d "
              f"'{{\"model\": \"{spec.models[0].id}\", \"messages\": [{{\"role\": \"user\", \"content\": \"hi\"}}]}}'")


def serve_remote(spec: Any, base: Any, endpoint: Any) -> None:
    """Deploy through a job on a head that does not share this disk; its deploy log streams here."""
    import tempfile

    from gpufleet.jobs.submit import follow
    from gpufleet.serve_apps.remote import SPEC_FILE, stage_serve

    client = endpoint.job_client()
    with tempfile.TemporaryDirectory(prefix="gpufleet-serve-") as tmp:
        env = stage_serve(spec, base, Path(tmp))
        sid = client.submit_job(entrypoint=f"python -m gpufleet.serve_apps.remote deploy {SPEC_FILE}",
                                runtime_env={"working_dir": tmp, "env_vars": env},
                                metadata={"gpufleet": "serve", "name": spec.name})
    out.print(f"deploying {spec.name} through job {sid} on {endpoint.dashboard_url} (vLLM replicas load the model)")
    status = follow(client, sid, on_line=lambda line: err.print(line, markup=False, highlight=False, soft_wrap=True))
    if status != "SUCCEEDED":
        raise GpufleetError(fix(f"serve app {spec.name} was not deployed (job {sid} {status})",
                                f"the lines above say why; `gpufleet jobs logs {sid}` keeps them"))
    out.print(f"[bold green]serving[/] {', '.join(m.id for m in spec.models)}: `gpufleet apps list` shows it")


@main.command("demo")
@options_from(DemoOptions, *DemoOptions.model_fields)
def demo_cmd(**options: Any) -> None:
    """The whole story on a local cluster: plan, fine-tune, serve, answer (docs/getting-started.md)."""
    from gpufleet.demo import console, run_demo

    args = validated(DemoOptions, **options)
    os.environ.setdefault("GPUFLEET_HOME", str(args.home))  # before the log file is placed under it
    quiet_unless_verbose("demo", console)
    sys.exit(run_demo(args))


if __name__ == "__main__":
    main()
