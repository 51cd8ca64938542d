"""The main job: every task on its shipped default dataset, a small training budget, the
default recipes, one report per task."""
from __future__ import annotations

from pathlib import Path

from .output import check_output, staged_output
from .pipeline import compress
from .recipe import resolve
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
