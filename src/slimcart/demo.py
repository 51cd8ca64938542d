"""The main job: every task on its shipped default dataset, a small training budget, the
default recipes, one report per task."""
from __future__ import annotations

from pathlib import Path

from .output import check_output, staged_output
from .pipeline import compress
from .recipe import resolve
from .report.markdown import DASH, fmt_mb, fmt_ms, fmt_pts, fmt_x
from .result import Result
from .tasks import DEFAULT_DATASET, load_task

DEFAULT_RECIPES = {
    "intent": ["intent/int8-dynamic", "intent/onnx-int8"],
    "product_image": ["product_image/onnx", "product_image/onnx-int8"],
    "ctr": ["ctr/int8-dynamic", "ctr/onnx-int8", "ctr/prune-threshold"],
}


def run_demo(out: Path, *, data_dir=None, overwrite: bool = False, progress: bool = True,
             tasks: list[str] | None = None) -> list[Result]:
    check_output(out, overwrite)
    results = []
    with staged_output(out, overwrite) as stage:
        for name in tasks or list(DEFAULT_RECIPES):
            task = load_task(name, DEFAULT_DATASET[name], data_dir=data_dir)
            model = task.train_baseline("demo", progress=progress)
            res = compress(model, task, [resolve(r) for r in DEFAULT_RECIPES[name]], progress=progress,
                           baseline_info=model.slimcart_training)
            try:
                res.save(stage / name)
            finally:
                res.cleanup()
            results.append(res.result)
    return results


def combined_table(results: list[Result]) -> list[dict[str, str]]:
    """One row per task, variant and runtime: the whole demo at a glance. Speedups are
    against the baseline in the same runtime, at the smallest and largest batch."""
    rows = []
    for r in results:
        m = r.primary_metric
        base = r.baseline.metrics.get(m)
        for v in r.variant_rows():
            for rt, per in v.latency_ms.items():
                b_lo, b_hi = sorted(per, key=int)[0], sorted(per, key=int)[-1]
                sp = v.speedup_vs_baseline.get(rt, {})
                rows.append({
                    "task": f"{r.task}/{r.dataset}", "variant": v.name, "runtime": rt,
                    "size MB": fmt_mb(v.size_bytes), "compression": fmt_x(v.compression_ratio),
                    "metric": f"{m} {v.metrics.get(m, float('nan')):.4f}",
                    "Δ pts": DASH if v is r.baseline else fmt_pts(v.metrics.get(m, float("nan")) - base),
                    "p50 ms, small batch": f"{fmt_ms(per[b_lo].p50)} (b={b_lo}, {fmt_x(sp.get(b_lo, float('nan')))})",
                    "p50 ms, large batch": f"{fmt_ms(per[b_hi].p50)} (b={b_hi}, {fmt_x(sp.get(b_hi, float('nan')))})",
                })
    return rows
