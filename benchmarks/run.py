"""Regenerate BENCHMARKS.md: every task on its real datasets, baseline vs each shipped recipe,
all measured in one process per task (interleaved timing; ratios are what to read).

    python benchmarks/run.py --out BENCHMARKS.md            # everything (about 30 min on 2 cores)
    python benchmarks/run.py --only ctr --out /tmp/b.md     # one task
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import time
from pathlib import Path

import slimcart as sc
from slimcart.pipeline import environment
from slimcart.report import summary_table

CASES = [
    ("intent", "bitext", ["intent/int8-dynamic", "intent/onnx-int8", "intent/prune30-onnx"]),
    ("intent", "banking77", ["intent/int8-dynamic", "intent/onnx-int8", "intent/prune30-onnx"]),
    ("product_image", "fashion-mnist", ["product_image/onnx", "product_image/onnx-int8",
                                        "product_image/prune50-global"]),
    ("ctr", "womens-reviews", ["ctr/int8-dynamic", "ctr/onnx-int8", "ctr/prune-threshold"]),
    ("ctr", "online-shoppers", ["ctr/int8-dynamic", "ctr/onnx-int8", "ctr/prune-threshold"]),
    ("ctr", "synthetic:rows=200000,fields=8,vocab=100000", ["ctr/int8-dynamic", "ctr/onnx-int8",
                                                            "ctr/prune-threshold"]),
]


def markdown_table(rows: list[dict]) -> str:
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="BENCHMARKS.md")
    ap.add_argument("--runs", default="runs/bench", help="where the full reports go")
    ap.add_argument("--only", default=None, help="task name to run alone")
    ap.add_argument("--budget", default="full", choices=["full", "demo"])
    args = ap.parse_args()
    sections = []
    for task_name, dataset, recipes in CASES:
        if args.only and task_name != args.only:
            continue
        t0 = time.time()
        task = sc.load_task(task_name, dataset)
        model = task.train_baseline(args.budget)
        res = sc.compress(model, task, recipes, baseline_info=model.slimcart_training)
        out = Path(args.runs) / f"{task_name}-{dataset.split(':')[0]}"
        res.save(out, overwrite=True)
        res.cleanup()
        r = res.result
        train = model.slimcart_training
        extra = ""
        if "ceiling_auc" in task.info:
            extra = f" Planted ceiling AUC (true click probabilities): {task.info['ceiling_auc']:.4f}."
        sections.append(
            f"### {task_name} / {dataset}\n\n"
            f"Baseline trained {train['epochs']} epochs in {train['seconds']} s; test rows: "
            f"{task.describe()['rows']['test']}; {r.threads} threads; {r.measure['rounds']} timed rounds "
            f"per cell, interleaved.{extra} Full report: `{out}/report.md`.\n\n"
            + markdown_table(summary_table(r)) + "\n\n"
            + "Agreement with the baseline: "
            + "; ".join(f"{v.name}: " + ", ".join(f"{k} {x:.4f}" for k, x in v.agreement.items())
                        for v in r.variants) + "\n\n"
            + f"_Run time: {time.time() - t0:.0f} s._\n")
        print(sections[-1], flush=True)
    env = environment()
    header = (
        "# Benchmarks\n\n"
        f"Made by `python benchmarks/run.py --out BENCHMARKS.md` on {dt.date.today()} "
        f"({env['cpu']}, {platform.machine()}, torch {env['torch']}, onnxruntime {env['onnxruntime']}).\n\n"
        "How to read: every cell is measured, never estimated. Size is the bytes of the saved artifact "
        "(weights file + JSON spec). Latency is p50 per batch in ms; the number in brackets is the "
        "speedup against the baseline in the same runtime, timed in the same process with the "
        "variants interleaved (this machine drifts 20-30% between runs, so compare ratios, not "
        "absolute ms across sections). Metric deltas are in points (x100) against the baseline on "
        "the same test rows. `-` means the runtime cannot serve that artifact (see each report's notes).\n\n")
    Path(args.out).write_text(header + "\n".join(sections))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
