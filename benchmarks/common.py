"""Shared by the benchmark scripts: trained baselines cached on disk, and table formatting."""
from __future__ import annotations

import hashlib
import os
import sys
import time
from pathlib import Path

import slimcart as sc
from slimcart.report import summary_table
from slimcart.report.markdown import DASH, batch_key, fmt_mb, fmt_ms, fmt_rate
from slimcart.training import load_trained, save_trained

CACHE = Path("runs/bench/models")


def baseline(task, budget: str = "full", cache: Path = CACHE):
    """The task's trained baseline, trained once and reused by every benchmark script."""
    key = "".join(c if c.isalnum() or c in "-_" else "_" for c in task.dataset)
    # the training settings are part of the key: a changed baseline recipe trains anew
    settings = hashlib.sha256(task.train_config(budget).model_dump_json().encode()).hexdigest()[:8]
    folder = cache / f"{task.name}-{key}-{budget}-{settings}"
    if (folder / "slimcart.json").is_file():
        return load_trained(folder, task)
    model = task.train_baseline(budget)
    save_trained(model, task, folder, overwrite=True)
    return model


def grocery_store() -> Path:
    """The Grocery Store photo folder under $SLIMCART_DATA_DIR; exits with a clear message without it."""
    data = Path(os.environ.get("SLIMCART_DATA_DIR", "../shared/data")) / "images" / "grocery-store"
    if not data.is_dir():
        sys.exit(f"{data} not found: set SLIMCART_DATA_DIR to the folder holding images/grocery-store")
    return data


def markdown_table(rows: list[dict]) -> str:
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def speed_table(r) -> list[dict]:
    """Per variant and runtime: the bytes of the artifact that runtime serves, p50 with its 95%
    interval and the speedup with its interval (interleaved), p50 as deployed, and throughput."""
    rows = []
    for v in r.variant_rows():
        for rt, per in v.latency_ms.items():
            row = {"Variant": v.name, "Runtime": rt, "Served MB": fmt_mb(v.size_bytes_served.get(rt, v.size_bytes))}
            for b in sorted(per, key=batch_key):
                p, sp = per[b], v.speedup.get(rt, {}).get(b)
                row[f"b={b} p50 ms [95% CI]"] = f"{fmt_ms(p.p50)} [{fmt_ms(p.p50_low)}, {fmt_ms(p.p50_high)}]"
                row[f"b={b} speedup [95% CI]"] = DASH if v is r.baseline or sp is None else (
                    f"{sp.x:.2f}x [{sp.low:.2f}, {sp.high:.2f}]"
                    + (" =" if sp.verdict == "no measured difference" else ""))
                dep = v.latency_deployed_ms.get(rt, {}).get(b)
                row[f"b={b} as deployed p50 ms"] = DASH if dep is None else fmt_ms(dep.p50)
            big = sorted(per, key=batch_key)[-1]
            tp = v.throughput.get(rt, {}).get(big)
            row[f"samples/s b={big}"] = DASH if tp is None else fmt_rate(tp)
            rows.append(row)
    return rows


def run_section(task_name: str, dataset: str, recipes: list[str], runs: Path, title: str = "",
                budget: str = "full", measure=None) -> tuple[str, sc.pipeline.CompressResult]:
    """Compress with ``recipes``, save the full report under ``runs`` and return a markdown section."""
    t0 = time.time()
    task = sc.load_task(task_name, dataset)
    model = baseline(task, budget)
    res = sc.compress(model, task, recipes, baseline_info=model.slimcart_training, measure=measure)
    out = runs / f"{task_name}-{dataset.split(':')[0]}{'-' + title if title else ''}"
    res.save(out, overwrite=True)
    res.cleanup()
    r, train = res.result, model.slimcart_training
    extra = f" Planted ceiling AUC: {task.info['ceiling_auc']:.4f}." if "ceiling_auc" in task.info else ""
    text = (f"### {task_name} / {dataset}{' — ' + title if title else ''}\n\n"
            f"Baseline: {train.get('epochs')} epochs ({train.get('seconds')} s); "
            f"{task.describe()['rows']['test']} test rows; {r.threads} threads; {r.measure['rounds']} rounds x "
            f"{r.measure['calls_per_block']} timed calls per cell, interleaved in a shuffled order.{extra} "
            f"Full report: `{out}/report.md`.\n\n"
            + markdown_table(summary_table(r)) + "\n\n"
            + "Speed in detail (`=`: no measured difference, the interval includes 1.0 or the "
            "difference is under 3%):\n\n" + markdown_table(speed_table(r)) + "\n\n"
            + "Agreement with the baseline: "
            + "; ".join(f"{v.name}: " + ", ".join(f"{k} {x:.4g}" for k, x in v.agreement.items())
                        for v in r.variants) + "\n\n"
            + f"_Section run time: {time.time() - t0:.0f} s._\n")
    print(text, flush=True)
    return text, res
