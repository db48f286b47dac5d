"""Put measured GPU peaks (from measure.py) beside the catalogue's prediction.

Prints a table per case and a summary (median / worst absolute error, OOM cases predicted to
fit), and writes the comparison as JSON. Usage:

    python bench/memory/compare.py [bench/memory/results/h100-measured.json] [--out FILE] [--quiet]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from rich.console import Console
from rich.table import Table

from gpufleet.catalogue.memory import GIB, TrainSetup, estimate, fits
from gpufleet.catalogue.model import load_model

HERE = Path(__file__).parent
RECIPES = {  # measure.py recipe -> (task, dtype)
    "infer": ("infer", "bfloat16"),
    "lora": ("lora", "bfloat16"),
    "full-bf16": ("full", "bfloat16"),
    "full-mixed": ("full", "mixed"),
}


def compare(measured: dict) -> dict:
    """Predict every measured case; return rows and summary statistics."""
    gpu_bytes = measured["meta"]["gpu_total_bytes"]
    rows = []
    for r in measured["results"]:
        task, dtype = RECIPES[r["recipe"]]
        spec = load_model(r["model"])
        setup = TrainSetup(task=task, dtype=dtype, micro_batch=r["batch"], seq_len=r["seq"],
                           grad_ckpt=r["grad_ckpt"])
        pred = estimate(spec, setup).peak
        row = dict(model=r["model"], recipe=r["recipe"], grad_ckpt=r["grad_ckpt"], batch=r["batch"],
                   seq=r["seq"], status=r["status"], predicted_gib=round(pred / GIB, 3),
                   predicts_fit=fits(pred, gpu_bytes))
        if r["status"] == "ok":
            row["measured_gib"] = round(r["peak_bytes"] / GIB, 3)
            row["error"] = round((pred - r["peak_bytes"]) / r["peak_bytes"], 4)
        rows.append(row)
    errs = [abs(r["error"]) for r in rows if "error" in r]
    ooms = [r for r in rows if r["status"] == "oom"]
    summary = dict(
        gpu=measured["meta"]["gpu"], cases=len(rows), measured_ok=len(errs), oom=len(ooms),
        median_abs_error=round(statistics.median(errs), 4), worst_abs_error=round(max(errs), 4),
        within_5pct=sum(e <= 0.05 for e in errs), within_10pct=sum(e <= 0.10 for e in errs),
        oom_predicted_to_fit=[f"{r['model']} {r['recipe']} ckpt={r['grad_ckpt']} {r['batch']}x{r['seq']}"
                              for r in ooms if r["predicts_fit"]],
        models=sorted({r["model"] for r in rows}),
    )
    return dict(summary=summary, rows=rows)


def render(result: dict, console: Console, quiet: bool) -> None:
    if not quiet:
        t = Table(title="gpufleet estimate vs measured peak (torch.cuda.max_memory_allocated)")
        for col in ("model", "recipe", "ckpt", "shape", "measured GiB", "predicted GiB", "error"):
            t.add_column(col, justify="right" if "GiB" in col or col == "error" else "left")
        for r in result["rows"]:
            meas = f"{r['measured_gib']:.2f}" if "measured_gib" in r else "OOM"
            err = f"{r['error']:+.1%}" if "error" in r else ("fits?!" if r["predicts_fit"] else "OOM ok")
            t.add_row(r["model"], r["recipe"], "yes" if r["grad_ckpt"] else "", f"{r['batch']}x{r['seq']}",
                      meas, f"{r['predicted_gib']:.2f}", err)
        console.print(t)
    s = result["summary"]
    console.print(
        f"[bold]{s['gpu']}[/]: {s['measured_ok']} measured cases over {len(s['models'])} models, "
        f"median |error| {s['median_abs_error']:.1%}, worst {s['worst_abs_error']:.1%}, "
        f"{s['within_5pct']} within 5%, {s['within_10pct']} within 10%; "
        f"{s['oom']} OOM cases, {len(s['oom_predicted_to_fit'])} of them predicted to fit "
        f"{s['oom_predicted_to_fit'] or ''}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("measured", nargs="?", default=str(HERE / "results" / "h100-measured.json"))
    ap.add_argument("--out", default=str(HERE / "results" / "h100-compare.json"))
    ap.add_argument("--quiet", action="store_true", help="summary line only")
    args = ap.parse_args()
    result = compare(json.loads(Path(args.measured).read_text()))
    render(result, Console(), args.quiet)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
