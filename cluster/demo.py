"""`gpufleet demo`: the whole story on an embedded local cluster, stage by stage.

Builds a tiny model, starts a Ray head, prints plans, fine-tunes a LoRA adapter with
`ray job submit`, serves base and adapter through Ray Serve + vLLM, asks both the same question,
shows the cluster, and stops everything it started. Exits non-zero if any stage fails. What is
built (the model, the adapter) is reused by the next run; `make demo-clean` starts over.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import yaml
from rich.console import Console
from rich.rule import Rule

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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="The whole gpufleet story on a local cluster.")
    ap.add_argument("--demo-dir", default=".demo", help="Where the model, adapter and head state go.")
    ap.add_argument("--port", type=int, default=8000, help="OpenAI endpoint port.")
    ap.add_argument("--dashboard-port", type=int, default=8265)
    args = ap.parse_args(argv)
    root = Path.cwd()
    demo = Path(args.demo_dir).resolve()
    demo.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("GPUFLEET_HOME", str(demo / "home"))
    t0 = time.monotonic()
    from cluster.head import HeadConfig, free_port, load_state, start_head, stop_head

    started = False
    try:
        stage(1, "a tiny model: random weights, tokenizer trained locally")
        from jobs.tiny_model import build_tiny_model

        model_dir = build_tiny_model(demo / "tiny-model")
        console.print(f"model directory: {model_dir}")

        stage(2, "gpufleet up: a local Ray head")
        state = load_state()
        if state is None or not state.head_id:
            port = args.dashboard_port if _port_free(args.dashboard_port) else free_port()
            state = start_head(HeadConfig(num_cpus=8, dashboard_port=port))
            started = True
        console.print(f"Ray head at {state.address}; dashboard [link]{state.dashboard_url}[/link]; "
                      f"token {state.token_path}")
        from cluster.head import connect
        from cluster.monitor import start_monitors

        connect(state)

        stage(3, "plans from the catalogue")
        _print_plans(model_dir)

        stage(4, "LoRA fine-tune, submitted with `ray job submit`")
        adapter = demo / "lora-tiny" / "final"
        if (adapter / "adapter_model.safetensors").exists():
            console.print(f"reusing the adapter trained by an earlier run: {adapter}")
        else:
            job = derived_spec(root / "examples" / "lora-tiny.yaml", demo / "lora-tiny.yaml", model=str(model_dir),
                               dataset=str(root / "examples" / "data" / "greetings.jsonl"),
                               output_dir=str(demo / "lora-tiny"))
            _train(job, state, root)

        stage(5, "serve base and adapter: Ray Serve + vLLM, OpenAI API")
        from serve_apps.app import deploy
        from serve_apps.spec import load_serve_spec

        start_monitors()
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
        from cluster.render import status_tables
        from cluster.status import collect_status

        for table in status_tables(collect_status(state)):
            console.print(table)
        from ray import serve

        serve.shutdown()
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


def _port_free(port: int) -> bool:
    import socket

    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def _print_plans(model_dir: Path) -> None:
    from cluster.gpus import get_gpu
    from cluster.planner import plan
    from cluster.render import plan_table
    from cluster.spec import load_model

    for model, task, gpu, kw in [(str(model_dir), "serve", "L4", {"seq_len": 512}),
                                 ("llama-3.1-8b", "lora", "A10G", {}), ("llama-3.1-70b", "serve", "H100-80GB", {})]:
        console.print(plan_table(plan(load_model(model), task, get_gpu(gpu), **kw)))


def _train(spec_path: Path, state, root: Path) -> None:
    from jobs.submit import resolved_spec

    resolved, _, _ = resolved_spec(spec_path)
    env = {**os.environ, **state.client_env()}
    cmd = [str(Path(sys.executable).with_name("ray")), "job", "submit", "--address", state.dashboard_url,
           "--working-dir", str(root), "--", "python", "-m", "jobs.finetune", str(resolved)]
    console.print("$ " + " ".join(cmd[1:]))
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = set()
    for line in proc.stdout:
        text = ANSI.sub("", line).rstrip()
        if ("step " in text and " loss " in text) or text.startswith(("done:", "error:")):
            key = text.split(")")[-1].strip()
            if key not in seen:  # Ray prints rank 0's line once per log stream
                seen.add(key)
                console.print(key)
    if proc.wait() != 0:
        raise RuntimeError(f"the fine-tune job failed (exit {proc.returncode}); see `ray job logs`")


if __name__ == "__main__":
    sys.exit(main())
