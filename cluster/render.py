"""Rich tables for plans, estimates and the catalogue. The only module that formats for humans."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from cluster.memory import GIB, MemoryBreakdown
from cluster.planner import Plan


def _g(n: int | float) -> str:
    return f"{n / GIB:,.2f}"


def breakdown_table(mem: MemoryBreakdown, title: str) -> Table:
    t = Table(title=title, show_header=True)
    t.add_column("component")
    t.add_column("GiB / GPU", justify="right")
    for k, v in mem.model_dump(exclude={"peak", "peak_phase", "cpu_offload"}).items():
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
    rows: list[tuple[str, str]] = [
        ("GPUs", f"{p.gpus} x {p.gpu} ({p.nodes} node{'s' if p.nodes > 1 else ''}, accelerator_type {p.accelerator_type})"),
        ("dtype", p.dtype),
    ]
    if p.task in ("serve", "infer"):
        rows.append(("parallelism", f"tensor {p.tensor_parallel} x pipeline {p.pipeline_parallel}"))
    else:
        rows += [
            ("parallelism", f"data {p.data_parallel}, DeepSpeed ZeRO-{p.zero_stage}"),
            ("offload", ", ".join(x for x, on in (("optimizer", p.offload_optimizer), ("parameters", p.offload_params)) if on) or "none"),
            ("gradient checkpointing", "on" if p.grad_ckpt else "off"),
            ("batch", f"global {p.global_batch} = micro {p.micro_batch} x accum {p.grad_accum} x dp {p.data_parallel}"),
        ]
    rows.append(("sequence length", str(p.seq_len)))
    if p.serving:
        s = p.serving
        rows += [
            ("gpu_memory_utilization", f"{s.gpu_memory_utilization:.2f}"),
            ("weights / GPU", f"{_g(s.weights)} GiB"),
            ("KV cache / GPU", f"{_g(max(s.kv_cache, 0))} GiB, {s.kv_bytes_per_token:,} B/token, {s.kv_tokens:,} tokens"),
            ("max_model_len", f"{s.max_model_len:,}"),
            (f"concurrent seqs @ {s.context}", str(s.concurrent_seqs)),
        ]
    rows += [
        ("peak / GPU", f"[bold]{p.peak_gib:.1f} GiB[/] of {p.gpu_bytes / GIB:.1f} (headroom {p.headroom:.0%})"),
        ("Ray placement", f"{p.gpus} bundles {p.bundles[0]}, {p.placement_strategy}"),
    ]
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
    console.print(f"[red]error:[/] {message}", highlight=False, soft_wrap=True)
