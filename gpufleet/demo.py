"""`gpufleet demo`: the whole story on an embedded local cluster, stage by stage.

Builds a tiny model, starts a Ray head, prints plans, fine-tunes a LoRA adapter with
`ray job submit`, serves base and adapter through Ray Serve + vLLM, asks both the same question,
shows the cluster, and stops everything it started. Exits non-zero if any stage fails. What is
built (the model, the adapter) is reused by the next run; `make demo-clean` starts over.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import yaml
from pydantic import Field
from rich.console import Console
from rich.rule import Rule

from gpufleet.catalogue.config import Config

console = Console()
QUESTION = "Greet zoe."
ANSI = re.compile(r"\x1b\[[0-9;]*m")
TRAINED_MARK = "GPUFLEET SAYS"


def stage(n: int, title: str) -> None:
    console.print(Rule(f"[bold cyan]{n}/7  {title}"))


def derived_spec(template: Path, target: Path, **changes) -> Path:
    """Copy an example spec with some keys replaced (absolute paths for this run)."""
    data = yaml.safe_load(template.read_text())
    for key, value in changes.items():
        if key == "model_entry":
            data["models"][0].update(value)
        else:
            data[key] = value
    target.write_text(yaml.safe_dump(data, sort_keys=False))
    return target


class DemoOptions(Config):
    """Options of `gpufleet demo`."""

    demo_dir: Path = Field(default=Path(".demo"), description="Where the model, adapter and head state go.")
    port: int = Field(default=8000, ge=1, le=65535, description="Port of the OpenAI endpoint.")
    dashboard_port: int = Field(default=8265, ge=1, le=65535,
                                description="Dashboard port of the demo's head (a free one if taken).")

    @property
    def home(self) -> Path:
        """The demo's GPUFLEET_HOME: its head's state and the log of its libraries."""
        return Path(self.demo_dir).resolve() / "home"


def run_demo(args: DemoOptions) -> int:
    """Every stage in order; 0 when the adapter answers in the trained format."""
    root = Path.cwd()
    demo = Path(args.demo_dir).resolve()
    demo.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("GPUFLEET_HOME", str(args.home))
    t0 = time.monotonic()
    from gpufleet.cluster.head import HeadConfig, free_port, load_state, port_is_free, start_head, stop_head

    started = False
    try:
        stage(1, "a tiny model: random weights, tokenizer trained locally")
        from gpufleet.jobs.tiny_model import build_tiny_model

        model_dir = build_tiny_model(demo / "tiny-model")
        console.print(f"model directory: {model_dir}")

        stage(2, "gpufleet up: a local Ray head")
        state = load_state()
        if state is None or not state.head_id:
            port = args.dashboard_port if port_is_free(args.dashboard_port) else free_port()
            state = start_head(HeadConfig(num_cpus=8, dashboard_port=port))
            started = True
        console.print(f"Ray head at {state.address}; dashboard [link]{state.dashboard_url}[/link]; "
                      f"token {state.token_path}")
        from gpufleet.cluster.head import connect
        from gpufleet.cluster.monitor import ensure_monitoring

        connect(state)

        stage(3, "plans from the catalogue")
        _print_plans(model_dir)

        stage(4, "LoRA fine-tune, submitted as a Ray job (what `gpufleet train` does)")
        adapter = demo / "lora-tiny" / "final"
        if (adapter / "adapter_model.safetensors").exists():
            console.print(f"reusing the adapter trained by an earlier run: {adapter}")
        else:
            job = derived_spec(root / "examples" / "lora-tiny.yaml", demo / "lora-tiny.yaml", model=str(model_dir),
                               dataset=str(root / "examples" / "data" / "greetings.jsonl"),
                               output_dir=str(demo / "lora-tiny"))
            _train(job, state)

        stage(5, "serve base and adapter: Ray Serve + vLLM, OpenAI API")
        from gpufleet.serve_apps.app import deploy
        from gpufleet.serve_apps.spec import load_serve_spec

        ensure_monitoring()
        serve_file = derived_spec(root / "examples" / "serve-tiny.yaml", demo / "serve-tiny.yaml", port=args.port,
                                  model_entry={"source": str(model_dir), "adapters": {"greeter": str(adapter)}})
        spec, base = load_serve_spec(serve_file)
        t = time.monotonic()
        url = deploy(spec, base)
        console.print(f"serving at {url} after {time.monotonic() - t:.0f}s")

        stage(6, f"ask both the same question: {QUESTION!r}")
        from openai import OpenAI

        client = OpenAI(base_url=url, api_key="none")
        answers = {}
        for model in ("tiny", "tiny:greeter"):
            r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": QUESTION}],
                                               max_tokens=16, temperature=0)
            answers[model] = r.choices[0].message.content
            console.print(f"[bold]{model:>13}[/]: {answers[model]!r}")
        learned = TRAINED_MARK in answers["tiny:greeter"] and TRAINED_MARK not in answers["tiny"]
        (demo / "answers.json").write_text(json.dumps({"question": QUESTION, "answers": answers, "learned": learned}))
        console.print("[green]the adapter learned the answer format[/]" if learned
                      else "[red]the adapter did not learn the answer format[/]")

        stage(7, "gpufleet status, then gpufleet down")
        from gpufleet.cluster.endpoint import from_head
        from gpufleet.cluster.status import collect_status
        from gpufleet.render import status_tables

        for table in status_tables(collect_status(from_head(state), state.address)):
            console.print(table)
        if not started:  # someone else's head: remove only the demo's app, not every app Serve runs there
            from ray import serve

            serve.delete(spec.name)
        # On the demo's own head, `down` below stops every process at once: Serve's shutdown first would wait
        # out each HAProxy-fronted replica's 30 s deregistration window, for a proxy that is about to stop.
        console.print(f"demo finished in {time.monotonic() - t0:.0f}s")
        return 0 if learned else 1
    except Exception as e:
        console.print(f"[red]demo failed:[/] {type(e).__name__}: {e}")
        return 1
    finally:
        import ray

        if ray.is_initialized():
            ray.shutdown()
        if started:
            n = stop_head()
            console.print(f"gpufleet down: stopped {n} processes; nothing left running")


def _print_plans(model_dir: Path) -> None:
    from gpufleet.catalogue.gpus import get_gpu
    from gpufleet.catalogue.model import load_model
    from gpufleet.catalogue.planner import plan
    from gpufleet.render import plan_table

    for model, task, gpu, kw in [(str(model_dir), "serve", "L4", {"seq_len": 512}),
                                 ("llama-3.1-8b", "lora", "A10G", {}), ("llama-3.1-70b", "serve", "H100-80GB", {})]:
        console.print(plan_table(plan(load_model(model), task, get_gpu(gpu), **kw)))


def _train(spec_path: Path, state) -> None:
    """Submit the fine-tune as `gpufleet train` does (Ray's job API) and show its progress lines."""
    from gpufleet.cluster.endpoint import from_head
    from gpufleet.jobs.submit import follow, submit

    client, sid, _ = submit(spec_path, from_head(state))
    console.print(f"submitted {sid}: python -m gpufleet.jobs.finetune (ray job logs {sid} --address {state.dashboard_url})")
    seen = set()

    def show(line: str) -> None:
        text = ANSI.sub("", line).rstrip()
        if ("step " in text and " loss " in text) or text.startswith(("done:", "error:")):
            key = text.split(")")[-1].strip()
            if key not in seen:  # Ray prints rank 0's line once per log stream
                seen.add(key)
                console.print(key)

    status = follow(client, sid, on_line=show)
    if status != "SUCCEEDED":
        raise RuntimeError(f"the fine-tune job ended {status}; see `ray job logs {sid}`")
