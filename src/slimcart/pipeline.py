"""The pipeline: baseline -> each recipe's stages -> saved artifacts -> measurement -> Result.

Every variant is reloaded from its saved artifact before it is measured, so what is measured
is what a user deploys. Latency is timed for all variants in one process, interleaved.
"""
from __future__ import annotations

import copy
import datetime as dt
import platform
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import artifact, registry
from .errors import UsageError
from .measure.latency import interleaved
from .measure.memory import peak_rss_mb
from .measure.runtimes import OrtRunner, TorchRunner, set_threads
from .output import staged_output
from .recipe import MeasureConfig, Recipe, resolve, technique_name
from .result import Percentiles, Result, Variant
from .stage import ModelState, StageContext, StageReport
from .tasks.base import Task

SPEC_ATTR = "slimcart_spec"


@dataclass
class _Run:
    name: str
    recipe: Recipe | None
    folder: Path
    stages: list[StageReport] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    runners: dict[str, Any] = field(default_factory=dict)
    measure_onnx: Path | None = None  # ONNX export of a PyTorch variant, made only for measurement


@dataclass
class CompressResult:
    """A finished run: the validated Result and the artifacts in a work folder."""

    result: Result
    workdir: Path

    def table(self) -> str:
        from .report import summary_table

        rows = summary_table(self.result)
        cols = list(rows[0])
        lines = [" | ".join(cols), " | ".join("---" for _ in cols)]
        lines += [" | ".join(str(r[c]) for c in cols) for r in rows]
        return "\n".join(lines)

    def save(self, out: str | Path, overwrite: bool = False) -> Path:
        """Write artifacts, result.json, report.md/html and pareto.png into ``out``, atomically."""
        from .report import write_report

        with staged_output(Path(out), overwrite) as stage:
            shutil.copytree(self.workdir / "artifacts", stage, dirs_exist_ok=True)
            (stage / "result.json").write_text(self.result.model_dump_json(indent=2))
            write_report(self.result, stage)
        return Path(out)

    def cleanup(self) -> None:
        shutil.rmtree(self.workdir, ignore_errors=True)


def apply_recipe(state: ModelState, recipe: Recipe, task: Task, workdir: Path,
                 progress: bool = True) -> tuple[ModelState, list[StageReport]]:
    """Run a recipe's stages in order on (a copy of) ``state``."""
    state = ModelState(state.format, state.spec, copy.deepcopy(state.torch_model), state.onnx_path,
                       dict(state.quant))
    reports = []
    for i, cfg in enumerate(recipe.stages):
        tech = registry.get(technique_name(cfg))
        t0 = time.perf_counter()
        rep = tech.apply(state, cfg, StageContext(task, workdir, i, progress))
        rep.seconds = time.perf_counter() - t0
        reports.append(rep)
    return state, reports


def compress(model: torch.nn.Module, task: Task, recipe: Any, *, spec: dict | None = None,
             measure: MeasureConfig | None = None, progress: bool = True,
             baseline_info: dict | None = None) -> CompressResult:
    """Compress ``model`` with one recipe or a list of recipes and measure every variant
    against the baseline. ``spec`` rebuilds the architecture (set by train_baseline)."""
    recipes = [resolve(r) for r in (recipe if isinstance(recipe, (list, tuple)) else [recipe])]
    spec = spec or getattr(model, SPEC_ATTR, None)
    if spec is None:
        raise UsageError("compress needs the model's architecture spec to save it without pickle.",
                         "Train it with task.train_baseline() or pass spec={'arch': ..., 'config': ...}.")
    measure = measure or recipes[0].measure
    threads = set_threads(measure.threads)
    workdir = Path(tempfile.mkdtemp(prefix="slimcart-"))
    try:
        return _compress(model, task, recipes, spec, measure, threads, workdir, progress, baseline_info)
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise


def _compress(model, task, recipes, spec, measure, threads, workdir, progress, baseline_info):
    arts = workdir / "artifacts"
    examples = task.example_inputs(max(32, max(measure.batch_sizes)), "test")
    desc = {"name": task.name, "dataset": task.dataset, **{k: v for k, v in task.info.items()
                                                            if k in ("classes", "num_classes")}}
    base_state = ModelState.from_module(model, spec)
    base = _Run("baseline", None, artifact.save(base_state, arts / "baseline", task=desc, examples=examples,
                                                 input_names=task.input_names))
    runs, used = [base], {"baseline"}
    for r in recipes:
        name = _unique(r.name, used)
        state, reports = apply_recipe(base_state, r, task, workdir / "stages" / name, progress)
        folder = artifact.save(state, arts / "variants" / name, task=desc, examples=examples,
                               input_names=task.input_names, stages=[x.to_dict() for x in reports])
        runs.append(_Run(name, r, folder, reports))
    for run in runs:
        _make_runners(run, task, measure, threads, workdir)
    outputs = {run.name: _score(run, task, measure) for run in runs}
    cases = {(run.name, rt, b): (fn, task.collate(_batch(examples, b)), b)
             for run in runs for rt, fn in run.runners.items() for b in measure.batch_sizes}
    timings = interleaved(cases, measure.rounds, measure.warmup, progress)
    base_out = outputs["baseline"]
    variants = []
    for run in runs:
        lat = {rt: {str(b): Percentiles(**timings[(run.name, rt, b)].summary()) for b in measure.batch_sizes}
               for rt in run.runners}
        thr = {rt: {str(b): round(timings[(run.name, rt, b)].throughput(), 2) for b in measure.batch_sizes}
               for rt in run.runners}
        mem, model_mem = {}, {}
        if measure.memory:
            for rt in run.runners:
                got = peak_rss_mb(run.folder, rt, max(measure.batch_sizes), threads,
                                  run.measure_onnx if rt == "onnxruntime" else None)
                if got:
                    mem[rt], model_mem[rt] = got["peak_rss_mb"], got["model_and_run_mb"]
        variants.append(dict(
            name=run.name, recipe=run.recipe.source if run.recipe else None,
            artifact=str(run.folder.relative_to(arts)), format=artifact.read_meta(run.folder)["format"],
            size_bytes=artifact.size_bytes(run.folder), metrics=task.metrics(outputs[run.name], task.labels("test", measure.eval_limit)),
            latency_ms=lat, throughput=thr, agreement=task.agreement(base_out, outputs[run.name]),
            peak_memory_mb=mem, model_memory_mb=model_mem, stages=[s.to_dict() for s in run.stages], notes=run.notes))
    b = variants[0]
    for v in variants:
        v["compression_ratio"] = b["size_bytes"] / max(1, v["size_bytes"])
        v["speedup_vs_baseline"] = {
            rt: {k: b["latency_ms"][rt][k].p50 / p.p50 for k, p in per.items()}
            for rt, per in v["latency_ms"].items() if rt in b["latency_ms"]}
    result = Result(task=task.name, dataset=task.dataset, threads=threads, primary_metric=task.primary_metric,
                    baseline=Variant(**variants[0]), variants=[Variant(**v) for v in variants[1:]],
                    environment=environment(), created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                    data=task.describe() | {"classes": None}, measure=measure.model_dump(),
                    baseline_training=baseline_info or {})
    return CompressResult(result, workdir)


def _make_runners(run: _Run, task: Task, measure: MeasureConfig, threads: int, workdir: Path) -> None:
    """Load the saved artifact back and build a runner for each runtime it can be served in."""
    from .accelerate.onnx_export import export_onnx

    state = artifact.load(run.folder)
    for rt in measure.runtimes:
        if rt == "torch":
            if state.torch_model is None:
                run.notes.append("torch: not measured: the artifact is an ONNX graph")
            else:
                run.runners[rt] = TorchRunner(state.torch_model)
        elif rt == "onnxruntime":
            path = state.onnx_path
            if state.format == registry.TORCH_INT8:
                run.notes.append("onnxruntime: not measured: dynamic-quantized PyTorch layers cannot "
                                 "be exported to ONNX (use onnx_export + ort_int8_dynamic)")
                continue
            if path is None:
                path = export_onnx(state.torch_model, task.example_inputs(2, "val"),
                                   workdir / f"measure-{run.name}.onnx", task.input_names,
                                   task.dynamic_axes())
                run.measure_onnx = path
                run.notes.append("onnxruntime: measured on an ONNX export of this PyTorch model")
            run.runners[rt] = OrtRunner(path, task.input_names, threads)


def _score(run: _Run, task: Task, measure: MeasureConfig) -> np.ndarray:
    """Outputs on the test split, in the runtime the artifact is served in."""
    prefer = "onnxruntime" if artifact.read_meta(run.folder)["format"] == registry.ONNX else "torch"
    rt = prefer if prefer in run.runners else next(iter(run.runners), None)
    if rt is None:
        raise UsageError(f"variant {run.name}: none of the runtimes {measure.runtimes} can serve it.",
                         "Add 'onnxruntime' or 'torch' to measure.runtimes in the recipe.")
    run.notes.append(f"metrics: scored in {rt}")
    return task.predict(run.runners[rt], "test", measure.eval_limit)


def _batch(examples: tuple[torch.Tensor, ...], b: int) -> tuple[torch.Tensor, ...]:
    idx = torch.arange(b) % examples[0].shape[0]
    return tuple(t[idx].contiguous() for t in examples)


def _unique(name: str, used: set[str]) -> str:
    out, i = name, 2
    while out in used:
        out, i = f"{name}-{i}", i + 1
    used.add(out)
    return out


def environment() -> dict[str, Any]:
    import onnxruntime

    cpu = platform.processor()
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"python": platform.python_version(), "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__, "cpu": cpu, "machine": platform.machine(),
            "slimcart": __import__("slimcart").__version__}
