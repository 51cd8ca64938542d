"""Shared by the benchmark scripts: trained baselines cached on disk, and table formatting."""
from __future__ import annotations

import time
from pathlib import Path

import slimcart as sc
from slimcart.report import summary_table
from slimcart.training import load_trained, save_trained

CACHE = Path("runs/bench/models")


def baseline(task, budget: str = "full", cache: Path = CACHE):
    """The task's trained baseline, trained once and reused by every benchmark script."""
    key = "".join(c if c.isalnum() or c in "-_" else "_" for c in task.dataset)
    folder = cache / f"{task.name}-{key}-{budget}"
    if (folder / "slimcart.json").is_file():
        return load_trained(folder, task)
    model = task.train_baseline(budget)
    save_trained(model, task, folder, overwrite=True)
    return model


def markdown_table(rows: list[dict]) -> str:
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


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
            f"{task.describe()['rows']['test']} test rows; {r.threads} threads; {r.measure['rounds']} timed "
            f"rounds per cell, interleaved, each a block of back-to-back calls.{extra} Full report: `{out}/report.md`.\n\n"
            + markdown_table(summary_table(r)) + "\n\n"
            + "Agreement with the baseline: "
            + "; ".join(f"{v.name}: " + ", ".join(f"{k} {x:.4g}" for k, x in v.agreement.items())
                        for v in r.variants) + "\n\n"
            + f"_Section run time: {time.time() - t0:.0f} s._\n")
    print(text, flush=True)
    return text, res
