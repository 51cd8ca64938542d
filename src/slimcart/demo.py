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
    "product_image": ["product_image/onnx", "product_image/static-int8"],
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
    """One row per task, variant and runtime: the whole demo at a glance. Size is the artifact that
    runtime serves; speedups are against the baseline in the same runtime, at the smallest and
    largest batch ("=": no measured difference)."""
    rows = []
    for r in results:
        m = r.primary_metric
        base = r.baseline.metrics.get(m)
        for v in r.variant_rows():
            for rt, per in v.latency_ms.items():
                b_lo, b_hi = sorted(per, key=int)[0], sorted(per, key=int)[-1]
                sp = {b: ("=" if d.verdict == "no measured difference" else fmt_x(d.x))
                      for b, d in v.speedup.get(rt, {}).items()} if v is not r.baseline else {}
                rows.append({
                    "task": f"{r.task}/{r.dataset}", "variant": v.name, "runtime": rt,
                    "size MB": fmt_mb(v.size_bytes_served.get(rt, v.size_bytes)),
                    "compression": fmt_x(v.compression_ratio),
                    "metric": f"{m} {v.metrics.get(m, float('nan')):.4f}",
                    "Δ pts": DASH if v is r.baseline else fmt_pts(v.metrics.get(m, float("nan")) - base),
                    "p50 ms, small batch": f"{fmt_ms(per[b_lo].p50)} (b={b_lo}, {sp.get(b_lo, DASH)})",
                    "p50 ms, large batch": f"{fmt_ms(per[b_hi].p50)} (b={b_hi}, {sp.get(b_hi, DASH)})",
                })
    return rows
