"""Rich tables for plans, estimates and the catalogue. The only module that formats for humans."""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from gpufleet.catalogue.memory import CUDA_CONTEXT, GIB, MemoryBreakdown
from gpufleet.catalogue.plans import InferPlan, Plan, ServePlan


def _g(n: int | float) -> str:
    return f"{n / GIB:,.2f}"


def breakdown_table(mem: MemoryBreakdown, title: str) -> Table:
    t = Table(title=title, show_header=True)
    t.add_column("component")
    t.add_column("GiB / GPU", justify="right")
    for k, v in mem.model_dump(exclude={"peak", "peak_phase", "cpu_offload"}).items():  # kv_cache included
        if v:
            t.add_row(k.replace("_", " "), _g(v))
    t.add_row(f"[bold]peak[/] ({mem.peak_phase})", f"[bold]{_g(mem.peak)}[/]")
    if mem.cpu_offload:
        t.add_row("host memory (offload)", _g(mem.cpu_offload))
    return t


def plan_table(p: Plan) -> Table:
    t = Table(title=f"plan: {p.model} / {p.task} / {p.gpu}", show_header=False)
    t.add_column("field", style="cyan")
    t.add_column("value")
    where = f"{p.nodes} node{'s' if p.nodes > 1 else ''}" + (f", accelerator_type {p.accelerator_type}"
                                                              if p.accelerator_type else "")
    rows: list[tuple[str, str]] = [("GPUs" if p.accelerator_type else "TP ranks", f"{p.gpus} x {p.gpu} ({where})"),
                                   ("dtype", p.dtype)]
    if isinstance(p, ServePlan):
        rows.append(("parallelism", f"tensor {p.tensor_parallel} x pipeline {p.pipeline_parallel}"))
    elif isinstance(p, InferPlan):
        rows.append(("parallelism", f"device_map over {p.pipeline_parallel} GPUs"))
        if p.task == "generate":
            rows.append(("batch", f"{p.micro_batch} x ({p.seq_len} prompt + {p.new_tokens} new tokens)"))
        if p.quantization:
            rows.append(("quantized weights", p.quantization))
        if p.split and len(p.split.peak_per_gpu) > 1:
            rows.append(("peak per GPU", " / ".join(f"{(x + CUDA_CONTEXT) / GIB:.1f}" for x in p.split.peak_per_gpu)
                         + " GiB"))
    else:
        engine = "transformers + peft, bitsandbytes nf4" if p.task == "qlora" else f"DeepSpeed ZeRO-{p.zero_stage}"
        rows += [
            ("parallelism", f"data {p.data_parallel}, {engine}"),
            ("offload", ", ".join(x for x, on in (("optimizer", p.offload_optimizer), ("parameters", p.offload_params)) if on) or "none"),
            *([("host memory", f"{_g(p.host_bytes_per_gpu)} GiB per GPU, {_g(p.host_bytes_per_node)} GiB per node")]
              if p.host_bytes_per_gpu else []),
            ("gradient checkpointing", "on" if p.grad_ckpt else "off"),
            ("torch.compile", "on" if p.compile else "off"),
            ("batch", f"global {p.global_batch} = micro {p.micro_batch} x accum {p.grad_accum} x dp {p.data_parallel}"),
            ("predicted speed", f"{p.predicted_tokens_per_s:,.0f} tokens/s; {p.gpu_hours_per_million_tokens:.3f} "
                                "GPU-hours per million tokens"),
        ]
    rows.append(("sequence length", str(p.seq_len)))
    if isinstance(p, ServePlan):
        s = p.serving
        if p.accelerator_type:
            rows += [("gpu_memory_utilization", f"{s.gpu_memory_utilization:.2f}"),
                     ("weights / GPU", f"{_g(s.weights)} GiB")]
        rows += [
            ("KV cache", f"{_g(max(s.kv_cache, 0))} GiB, {s.kv_bytes_per_token:,} B/token, {s.kv_tokens:,} tokens"),
            ("max_model_len", f"{s.max_model_len:,}"),
            ("concurrent requests", f"{s.concurrent_at_expected} of {s.expected_tokens} tokens "
                                    f"({s.concurrent_seqs} of the full {s.context})"),
            ("vLLM engine_kwargs", ", ".join(f"{k}={v}" for k, v in p.engine_kwargs.items())),
            ("autoscaling", f"max_ongoing_requests {p.max_ongoing_requests}, target {p.target_ongoing_requests}"),
        ]
        rows += [("engine env", ", ".join(f"{k}={v}" for k, v in p.engine_env.items()))] if p.engine_env else []
    if p.gpu_bytes:
        rows.append(("peak / GPU", f"[bold]{p.peak_gib:.1f} GiB[/] of {p.gpu_bytes / GIB:.1f} (headroom {p.headroom:.0%})"))
    rows.append(("Ray placement", f"{len(p.bundles)} bundles {p.bundles[0]}, {p.placement_strategy}"))
    rows += [("note", n) for n in p.notes]
    for k, v in rows:
        t.add_row(k, v)
    return t


def catalogue_table(rows: list[dict], gpus: list[str], tasks: list[str]) -> Table:
    t = Table(title="gpufleet catalogue: GPUs needed per replica/job (TP size, or ZeRO stage; +off = CPU offload)")
    t.add_column("model")
    t.add_column("params", justify="right")
    t.add_column("task")
    for g in gpus:
        t.add_column(g, justify="center")
    for r in rows:
        for j, task in enumerate(tasks):
            cells = [r["plans"][g][task] for g in gpus]
            t.add_row(r["model"] if j == 0 else "", f"{r['params_b']:.1f}B" if j == 0 else "", task,
                      *[c["short"] if c else "[red]does not fit[/]" for c in cells],
                      end_section=j == len(tasks) - 1)
    return t


def print_error(console: Console, message: str) -> None:
    # the message is text, not markup: a field path such as models[tiny] must print as it is
    console.print(f"[red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)


def status_tables(st) -> list[Table]:
    """Tables for `gpufleet status` (nodes, placement groups, jobs, Serve apps, GPU metrics)."""
    nodes = Table(title=f"nodes of {st.address}" + (f"  (dashboard {st.dashboard_url})" if st.dashboard_url else ""))
    for c in ("node", "address", "state", "GPU type", "GPUs used/total", "CPUs used/total"):
        nodes.add_column(c)
    for n in st.nodes:
        nodes.add_row(n.node_id[:12], n.address, "alive" if n.alive else "[red]dead[/]", n.accelerator_type or "-",
                      f"{n.gpus_total - n.gpus_free:g}/{n.gpus_total:g}", f"{n.cpus_total - n.cpus_free:g}/{n.cpus_total:g}")
    groups = Table(title="placement groups")
    for c in ("id", "name", "state", "strategy", "bundles", "owner", "waiting for"):
        groups.add_column(c)
    for g in st.placement_groups:
        groups.add_row(g.id[:12], g.name, g.state, g.strategy, str(len(g.bundles)), g.owner, g.waiting_for)
    jobs = Table(title="jobs")
    for c in ("submission id", "status", "entrypoint"):
        jobs.add_column(c)
    for j in st.jobs:
        jobs.add_row(j.get("submission_id") or "-", j.get("status", j.get("error", "")), (j.get("entrypoint") or "")[:60])
    apps = Table(title="serve apps")
    for c in ("app", "status", "route", "deployments"):
        apps.add_column(c)
    for a in st.serve_apps:
        apps.add_row(a["name"], str(a["status"]), str(a["route_prefix"]), ", ".join(f"{k}: {v}" for k, v in a["deployments"].items()))
    gpus = Table(title="GPU metrics (NVML)")
    for c in ("node", "GPU", "name", "util %", "memory used / total GiB", "power W", "temp C"):
        gpus.add_column(c)
    if not st.gpu_metrics:
        gpus.add_row("-", "-", "no GPU nodes in the cluster", "", "", "", "")
    for r in st.gpu_metrics:
        if r.get("error") or not r.get("available"):
            gpus.add_row(str(r.get("node", ""))[:12], "-", r.get("error") or r.get("message", ""), "", "", "", "")
        for s in r.get("gpus", []):
            gpus.add_row(r["node"][:12], str(s["index"]), s["name"], f"{s['utilization_percent']:.0f}",
                         f"{s['memory_used_bytes'] / GIB:.1f} / {s['memory_total_bytes'] / GIB:.1f}",
                         f"{s['power_watts']:.0f}", f"{s['temperature_celsius']:.0f}")
    return [nodes, groups, jobs, apps, gpus]


def jobs_table(rows: list[dict]) -> Table:
    """`gpufleet jobs list`: one row a job, newest first."""
    import datetime

    t = Table(title="jobs")
    for c in ("submission id", "status", "kind", "name", "started", "entrypoint"):
        t.add_column(c)
    for r in rows:
        started = datetime.datetime.fromtimestamp(r["start_time"] / 1000).strftime("%Y-%m-%d %H:%M") if r[
            "start_time"] else "-"
        t.add_row(r["submission_id"] or "-", r["status"], r["kind"] or "-", r["name"] or "-", started,
                  (r["entrypoint"] or "")[:60])
    return t


def apps_table(rows: list[dict]) -> Table:
    """`gpufleet apps list`: one row an app."""
    t = Table(title="serve apps")
    for c in ("app", "status", "route", "deployments"):
        t.add_column(c)
    for a in rows:
        t.add_row(a["name"], str(a["status"]), str(a["route_prefix"]),
                  ", ".join(f"{k}: {v}" for k, v in a["deployments"].items()))
    return t
