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

from . import gate, registry
from .errors import RecipeError, UsageError
from .measure.session import Session
from .output import staged_output
from .recipe import MeasureConfig, Recipe, check_order, resolve, technique_name
from .result import Result, Variant
from .stage import ModelState, StageContext, StageReport
from .tasks.base import Task
from .trainer import world_and_rank

SPEC_ATTR = "slimcart_spec"


@dataclass
class CompressResult:
    """A finished run: the validated Result and the artifacts in a work folder."""

    result: Result
    workdir: Path
    outputs: dict[str, np.ndarray] = field(default_factory=dict)  # variant -> its outputs on the test split

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

    def drop_slower(self) -> list[str]:
        """Remove the variants the speed gate marks "slower" (their artifacts too); they are listed
        in ``result.gated`` with the reason. Returns their names."""
        keep, gone = [], []
        for v in self.result.variants:
            if gate.gate_of(self.result, v)["verdict"] == "slower":
                gone.append(v)
                shutil.rmtree(self.workdir / "artifacts" / v.artifact, ignore_errors=True)
                self.outputs.pop(v.name, None)
            else:
                keep.append(v)
        self.result.variants = keep
        self.result.gated = [*self.result.gated,
                             *({"name": v.name, "reason": gate.gate_of(self.result, v)["reason"]} for v in gone)]
        return [v.name for v in gone]

    def cleanup(self) -> None:
        shutil.rmtree(self.workdir, ignore_errors=True)


def apply_recipe(state: ModelState, recipe: Recipe, task: Task, workdir: Path,
                 progress: bool = True, checkpoints: Path | None = None) -> tuple[ModelState, list[StageReport]]:
    """Run a recipe's stages in order on (a copy of) ``state``. With ``checkpoints``, each training
    stage keeps a resumable checkpoint there (per epoch) and a rerun continues from it."""
    state = ModelState(state.format, state.spec, copy.deepcopy(state.torch_model), state.onnx_path,
                       dict(state.quant))
    reports = []
    for i, cfg in enumerate(recipe.stages):
        tech = registry.get(technique_name(cfg))
        t0 = time.perf_counter()
        rep = tech.apply(state, cfg, StageContext(task, workdir, i, progress, checkpoints))
        rep.seconds = time.perf_counter() - t0
        reports.append(rep)
    return state, reports


def compress(model: Any, task: Task, recipe: Any, *, spec: dict | None = None,
             measure: MeasureConfig | None = None, progress: bool = True,
             baseline_info: dict | None = None, weights: str | Path | None = None,
             drop_slower: bool = False, checkpoints: Path | None = None) -> CompressResult | None:
    """Compress ``model`` with one recipe or a list of recipes and measure every variant against it.

    ``model``: an nn.Module (trained by slimcart, or any module: the task's inputs are its example
    inputs), a slimcart model folder, a Hugging Face sequence-classification folder, an ONNX file,
    or ``"torchvision:NAME"`` / ``"timm:NAME"`` with ``weights`` (a safetensors state dict).
    Variants are scored on validation; all of them are chosen, timed and scored on test.
    ``drop_slower``: leave out the variants the speed gate marks "slower" (see slimcart.gate).
    ``checkpoints``: a folder where training stages keep resumable checkpoints (one subfolder per
    variant); a rerun with the same folder resumes them.

    In a torch.distributed group of several ranks (e.g. under torchrun), training stages run
    data-parallel on every rank; rank 0 alone measures, and the other ranks return None."""
    recipes = [resolve(r) for r in (recipe if isinstance(recipe, (list, tuple)) else [recipe])]
    base_state, source_note, info = baseline_state(model, task, spec=spec, weights=weights)
    problems = [f"{r.source}: {p}" for r in recipes
                for p in check_order(r.stages, base_state.format, f"the {source_note}")]
    if problems:
        raise RecipeError("(for this model)", problems)
    measure = measure or recipes[0].measure
    used, named = {"baseline"}, []
    for r in recipes:
        named.append((_unique(r.name, used), r))
        used.add(named[-1][0])
    workdir = Path(tempfile.mkdtemp(prefix="slimcart-"))

    def stages(name: str, r: Recipe, show: bool) -> tuple[ModelState, list[StageReport]]:
        return apply_recipe(base_state, r, task, workdir / "stages" / name, show,
                            None if checkpoints is None else Path(checkpoints) / name)

    if world_and_rank()[1] != 0:  # the stages only: their training is data-parallel; rank 0 measures
        try:
            for name, r in named:
                stages(name, r, False)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        return None
    try:
        session = Session(task, measure, workdir, progress=progress)
        session.add("baseline", base_state, baseline=True)
        for name, r in named:
            state, reports = stages(name, r, progress)
            cand = session.add(name, state, recipe=r, stages=reports)
            kept = workdir / "stages" / name / "checkpoints"
            if kept.is_dir():  # e.g. gradual pruning's per-step checkpoints, saved with the variant
                shutil.copytree(kept, cand.folder / "checkpoints")
        result = measure_session(session, list(session.candidates), baseline_info or info or {},
                                 source=source_note)
        outputs = {n: c.outputs["test"] for n, c in session.candidates.items() if "test" in c.outputs}
        session.close()
        res = CompressResult(result, workdir, outputs)
        if drop_slower:
            res.drop_slower()
        return res
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise


def measure_session(session: Session, names: list[str], baseline_info: dict, source: str = "") -> Result:
    """Time the chosen candidates against the baseline and score them on test: the Result."""
    timings = session.time(names)
    task = session.task
    base = session.variant_record(session.baseline, timings)
    variants = [base] + [session.variant_record(session.candidates[n], timings)
                         for n in names if n != session.baseline.name]
    for v in variants:
        v["compression_ratio"] = base["size_bytes"] / max(1, v["size_bytes"])
        v["speedup_vs_baseline"] = {rt: {b: d["x"] for b, d in per.items()} for rt, per in v["speedup"].items()}
    families = {c.label: c.runtime.family for c in session.choices}
    for v in variants[1:]:
        v["gate"] = gate.assess(v, families)
        if v["gate"]["verdict"] == "slower":
            v["notes"] = [*v["notes"], f"speed gate: {v['gate']['reason']}; never chosen as the best "
                                       "variant, and `compress --gate` drops it"]
    return Result(task=task.name, dataset=task.dataset, threads=session.threads,
                  primary_metric=task.primary_metric, baseline=Variant(**variants[0]),
                  variants=[Variant(**v) for v in variants[1:]], environment=environment(),
                  created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                  data=task.describe() | {"classes": None}, measure=session.measure.model_dump(mode="json"),
                  runtimes=[c.record() for c in session.choices], baseline_training=baseline_info,
                  model_source=source, selection="all variants chosen; metrics on test, val_metrics on validation")


def baseline_state(model: Any, task: Task, *, spec: dict | None = None,
                   weights: str | Path | None = None) -> tuple[ModelState, str, dict]:
    """The model to compress as a ModelState, a one-line description, and its training record."""
    from . import sources

    if isinstance(model, torch.nn.Module):
        spec = spec or getattr(model, SPEC_ATTR, None)
        if spec is None:  # a plain module: check it runs on the task's inputs, keep a copy to rebuild it
            from .models.registry import instance_spec

            sources.resolve_source(model, example_inputs=task.example_inputs(2, "val"))
            _check_runs(model, task, f"model {type(model).__name__}")
            spec = instance_spec(model)
        return ModelState.from_module(model, spec), "model", getattr(model, "slimcart_training", {})
    src = sources.resolve_source(model, weights=Path(weights) if weights else None)
    if src.kind == "slimcart":
        from .training import load_trained

        net = load_trained(Path(model), task)
        return ModelState.from_module(net, net.slimcart_spec), f"slimcart model {model}", net.slimcart_training
    if src.kind == "onnx":
        sources.check_onnx_inputs(src, tuple(task.input_names))
        return ModelState(format=registry.ONNX, spec=src.spec, onnx_path=src.onnx_path), \
            f"ONNX file {model}", {}
    if src.kind == "hf":
        _check_labels(src.task_options.get("id2label") or [], task, str(model))
    _check_runs(src.model, task, src.description)
    return ModelState.from_module(src.model, src.spec), src.description, {}


def _check_labels(names: list[str], task: Task, where: str) -> None:
    """A classifier's label names must be the task's classes, in the task's order."""
    classes = [str(c) for c in task.info.get("classes") or []]
    if len(names) != len(classes):
        raise UsageError(f"{where} predicts {len(names)} labels but dataset {task.dataset} has "
                         f"{len(classes)} classes.", "Compress it on the data it was trained for.")
    if set(names) == set(classes) and list(names) != classes:
        raise UsageError(f"{where} orders its labels {names[:5]}..., the dataset orders its classes "
                         f"{classes[:5]}... (sorted): outputs would be scored against the wrong classes.",
                         "Save the model with id2label in sorted order of the class names.")


def _check_runs(model: torch.nn.Module, task: Task, what: str) -> None:
    x = task.example_inputs(2, "val")
    try:
        with torch.inference_mode():
            out = model.eval()(*x)
    except Exception as exc:  # the user's module raises whatever it raises
        shapes = ", ".join(f"{n} {tuple(t.shape)}" for n, t in zip(task.input_names, x))
        raise UsageError(f"{what} fails on the task's inputs ({shapes}): {type(exc).__name__}: "
                         f"{str(exc)[:200]}", "Check that the model fits this task and dataset "
                         "(input channels, image size, vocabulary).") from None
    want = (2,) if task.name == "ctr" else (2, task.info.get("num_classes"))
    if tuple(out.shape) != want:
        raise UsageError(f"{what} returns shape {tuple(out.shape)} on a batch of 2; the task needs {want}.",
                         "The number of classes must match the dataset's.")


def _unique(name: str, used: set[str]) -> str:
    out, i = name, 2
    while out in used:
        out, i = f"{name}-{i}", i + 1
    return out


def environment() -> dict[str, Any]:
    """Versions, CPU model, the instruction-set features that decide kernel speed, and the
    devices the runtimes can use (slimcart.measure.hardware)."""
    import onnxruntime

    from .measure import hardware

    cpu = hardware.cpu()
    return {"python": platform.python_version(), "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__, "openvino": hardware.openvino_version(),
            "cpu": cpu["model"], "machine": cpu["machine"], "cpu_cores": cpu["cores"],
            "cpu_features": cpu["features"], "torch_cpu_capability": cpu["torch_capability"],
            "cuda": torch.cuda.is_available(), "cuda_devices": hardware.cuda_devices(),
            "ort_providers": hardware.ort_providers(), "openvino_devices": hardware.openvino_devices(),
            "cxx_compiler": hardware.cxx_compiler(), "slimcart": __import__("slimcart").__version__}
