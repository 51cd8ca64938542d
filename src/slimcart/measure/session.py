"""A measurement session: the baseline is saved, reloaded and scored once; candidates are added,
saved as model folders, reloaded from disk and scored on the VALIDATION split; the chosen ones are
timed against the baseline (interleaved, in one process) and only they are scored on the TEST split
for the report. ``compress`` chooses every candidate; a search chooses on validation and never
sees test.

For every runtime a candidate is measured in, the artifact that runtime serves is saved: a float
PyTorch model timed in ONNX Runtime is exported to ``<variant>/served/onnxruntime/`` (a model
folder of its own), and its size, not the safetensors file's, is reported for that runtime.
Setup time (building each runner and its first call per batch size: a compile for
torch.compile) is reported apart from the steady-state latencies, which never include it.
"""
from __future__ import annotations

import gc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .. import artifact, formats
from ..errors import UsageError
from ..stage import ModelState, StageReport
from .latency import Timing, alone, interleaved, sustained_throughput
from .memory import peak_rss_mb
from .runtimes import Runner, RuntimeChoice, set_threads
from .stats import speedup

PARITY_ROWS = 256


@dataclass
class Candidate:
    name: str
    folder: Path
    format: str
    recipe: Any = None
    stages: list[StageReport] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    served: dict[str, Path] = field(default_factory=dict)       # runtime label -> folder it serves
    states: dict[str, ModelState] = field(default_factory=dict)  # runtime label -> loaded model
    runners: dict[str, Callable] = field(default_factory=dict)   # runtime label -> runner
    scored_in: str = ""
    outputs: dict[str, np.ndarray] = field(default_factory=dict)  # split -> outputs
    served_parity: dict[str, dict[str, float]] = field(default_factory=dict)


class Session:
    def __init__(self, task, measure, workdir: Path, *, progress: bool = True):
        self.task, self.measure, self.progress = task, measure, progress
        self.threads = set_threads(measure.threads)
        self.arts = workdir / "artifacts"
        self.workdir = workdir
        self.choices: list[RuntimeChoice] = measure.runtime_choices()
        # timing inputs come from the validation split: nothing in a session looks at test
        # before the chosen candidates are scored for the report
        self.examples = task.example_inputs(max(32, max(measure.batch_sizes)), "val")
        self.candidates: dict[str, Candidate] = {}
        self.baseline: Candidate | None = None

    # ---- building ------------------------------------------------------------------------
    def add(self, name: str, state: ModelState, *, recipe=None, stages: list[StageReport] = (),
            baseline: bool = False) -> Candidate:
        """Save ``state``, reload it from disk, build its runners and score it on validation."""
        if name in self.candidates:
            raise UsageError(f"a candidate named {name!r} is already in the session.")
        folder = self.arts / ("baseline" if baseline else f"variants/{name}")
        desc = {"name": self.task.name, "dataset": self.task.dataset,
                **{k: v for k, v in self.task.info.items() if k in ("classes", "num_classes")}}
        artifact.save(state, folder, task=desc, examples=self.examples, input_names=self.task.input_names,
                      stages=[s.to_dict() for s in stages], bundle=self.task)
        cand = Candidate(name, folder, state.format, recipe, list(stages))
        cand.notes.extend(f"{s.technique}: {n}" for s in stages for n in getattr(s, "notes", []))
        self._serve(cand)
        self._score(cand, "val")
        self.candidates[name] = cand
        if baseline:
            self.baseline = cand
        return cand

    def _serve(self, cand: Candidate) -> None:
        """For each runtime: the saved artifact it serves (converted and saved if needed) and a runner."""
        loaded = artifact.load(cand.folder)
        fmt = formats.get(cand.format)
        for choice in self.choices:
            label, family = choice.label, choice.runtime.family
            if family in fmt.serves:
                folder, state = cand.folder, loaded
            elif family in fmt.convert:
                folder = self._convert(cand, loaded, fmt.convert[family], family)
                state = artifact.load(folder)
                cand.notes.append(f"{label}: serves {folder.relative_to(cand.folder)}/ ({fmt.convert[family]}, "
                                  f"converted from the {cand.format} model and saved with it)")
            else:
                cand.notes.append(f"{label}: not measured: this runtime cannot serve a {cand.format} model"
                                  + (" (dynamic-quantized PyTorch layers cannot be exported to ONNX; use "
                                     "onnx_export + ort_int8_dynamic)" if cand.format == "torch_int8" else ""))
                continue
            cand.served[label], cand.states[label] = folder, state
            cand.runners[label] = choice.runner(state, self.task.input_names, self.threads)

    def _convert(self, cand: Candidate, loaded: ModelState, target: str, family: str) -> Path:
        folder = cand.folder / "served" / family
        if folder.is_dir():  # another runtime label of the same family already converted it
            return folder
        from ..accelerate.onnx_export import export_onnx

        if target != "onnx":
            raise UsageError(f"no converter from {cand.format} to {target}.")
        tmp = self.workdir / "convert" / cand.name
        tmp.mkdir(parents=True, exist_ok=True)
        path = export_onnx(loaded.torch_model, self.task.example_inputs(2, "val"), tmp / "model.onnx",
                           self.task.input_names, self.task.dynamic_axes())
        state = ModelState(format=target, spec=loaded.spec, onnx_path=path, quant=loaded.quant)
        meta = artifact.read_meta(cand.folder)
        artifact.save(state, folder, task=meta.get("task", {}), examples=self.examples,
                      input_names=self.task.input_names, stages=meta.get("stages"), bundle=self.task,
                      extra={"converted_from": {"format": cand.format, "folder": ".."}})
        return folder

    def _score(self, cand: Candidate, split: str) -> np.ndarray:
        """Outputs on ``split`` in the runtime that serves the candidate's own artifact."""
        if not cand.runners:
            raise UsageError(f"variant {cand.name}: none of the runtimes "
                             f"{[c.label for c in self.choices]} can serve a {cand.format} model.",
                             "Add 'onnxruntime' or 'torch' to measure.runtimes in the recipe.")
        if not cand.scored_in:
            own = [lb for lb, f in cand.served.items() if f == cand.folder]
            cand.scored_in = (own or list(cand.runners))[0]
            cand.notes.append(f"metrics: scored in {cand.scored_in}")
        out = self.task.predict(cand.runners[cand.scored_in], split, self.measure.eval_limit)
        cand.outputs[split] = out
        if split == "val":  # every other runtime's artifact must agree with the scored one
            for label, run in cand.runners.items():
                if label != cand.scored_in:
                    other = self.task.predict(run, split, min(PARITY_ROWS, self.measure.eval_limit or PARITY_ROWS))
                    diff = np.abs(other - out[: len(other)])
                    cand.served_parity[label] = {"max_abs_diff": float(diff.max()), "rows": int(len(other))}
        return out

    # ---- measuring ------------------------------------------------------------------------
    def val_metrics(self, name: str) -> dict[str, float]:
        c = self.candidates[name]
        return self.task.metrics(c.outputs["val"], self.task.labels("val", self.measure.eval_limit))

    def time(self, names: list[str]) -> dict[tuple, Timing]:
        """Interleaved timing of the baseline and ``names`` (each label, each batch size). The
        warm-up calls visit every case before the first timed round, so a runner that compiles
        per input shape (torch.compile) has compiled for every batch size by then."""
        m = self.measure
        runs = [self.baseline] + [self.candidates[n] for n in names if n != self.baseline.name]
        cases = {(c.name, label, b): (fn, self.task.collate(_batch(self.examples, b)), b)
                 for c in runs for label, fn in c.runners.items() for b in m.batch_sizes}
        return interleaved(cases, m.rounds, m.warmup, calls_per_block=m.calls_per_block, seed=m.seed,
                           progress=self.progress)

    def deployed(self, cand: Candidate) -> dict[str, dict[str, Timing]]:
        """Each runtime as deployed (its default options), timed alone."""
        m, out = self.measure, {}
        for choice in self.choices:
            if choice.label not in cand.states:
                continue
            run = choice.runner(cand.states[choice.label], self.task.input_names, self.threads, deployed=True)
            out[choice.label] = {str(b): alone(run, self.task.collate(_batch(self.examples, b)), b,
                                               max(10, m.rounds // 3), m.warmup, m.calls_per_block)
                                 for b in m.batch_sizes}
            del run
            gc.collect()
        return out

    def throughput(self, cand: Candidate) -> dict[str, dict[str, float]]:
        m = self.measure
        if m.throughput_seconds <= 0:
            return {}
        return {label: {str(b): round(sustained_throughput(fn, self.task.collate(_batch(self.examples, b)), b,
                                                           m.throughput_seconds)["samples_per_s"], 2)
                        for b in m.batch_sizes} for label, fn in cand.runners.items()}

    def variant_record(self, cand: Candidate, timings: dict[tuple, Timing]) -> dict[str, Any]:
        """Everything measured about ``cand`` (it is scored on test here), as Variant fields."""
        m, task, base = self.measure, self.task, self.baseline
        test_out = self._score(cand, "test") if "test" not in cand.outputs else cand.outputs["test"]
        lat, spd = {}, {}
        for label in cand.runners:
            lat[label], spd[label] = {}, {}
            for b in m.batch_sizes:
                t = timings[(cand.name, label, b)]
                lat[label][str(b)] = t.summary(seed=m.seed)
                if label in base.runners:
                    spd[label][str(b)] = speedup(timings[(base.name, label, b)], t, seed=m.seed)
        deployed = {lb: {b: t.summary(seed=m.seed) for b, t in per.items()}
                    for lb, per in (self.deployed(cand) if m.deployed else {}).items()}
        mem, model_mem, unprobed = {}, {}, []
        if m.memory:
            for label, folder in cand.served.items():
                probe = next(c.config.memory_probe() for c in self.choices if c.label == label)
                if probe is None:
                    unprobed.append(label)
                    continue
                got = peak_rss_mb(folder, probe, max(m.batch_sizes), self.threads)
                if got:
                    mem[label], model_mem[label] = got["peak_rss_mb"], got["model_and_run_mb"]
        if unprobed:
            self._note(cand, f"peak memory not measured for {', '.join(unprobed)} (the memory probe runs "
                             "eager torch in float32 and onnxruntime, on the CPU)")
        for label, run in cand.runners.items():   # fallbacks the runners took (provider, device, compile)
            for text in getattr(run, "notes", []):
                self._note(cand, f"{label}: {text}")
        sizes = {label: artifact.size_bytes(f) for label, f in cand.served.items()}
        return dict(
            name=cand.name, recipe=getattr(cand.recipe, "source", None),
            artifact=str(cand.folder.relative_to(self.arts)), format=cand.format,
            size_bytes=artifact.size_bytes(cand.folder), size_bytes_served=sizes,
            bundle_bytes=artifact.bundle_bytes(cand.folder),
            served={label: str(f.relative_to(self.arts)) for label, f in cand.served.items()},
            served_parity=cand.served_parity,
            val_metrics=self.val_metrics(cand.name),
            metrics=task.metrics(test_out, task.labels("test", m.eval_limit)),
            latency_ms=lat, latency_deployed_ms=deployed, setup_s=self.setup(cand), speedup=spd,
            throughput=self.throughput(cand),
            agreement=task.agreement(base.outputs.get("test", test_out), test_out) if cand is not base
            else task.agreement(test_out, test_out),
            peak_memory_mb=mem, model_memory_mb=model_mem, stages=[s.to_dict() for s in cand.stages],
            notes=cand.notes)

    def setup(self, cand: Candidate) -> dict[str, dict[str, float]]:
        """Per runtime label: ``build`` (seconds to build the runner: a session, a compiled graph),
        per batch size the wall time of the first call with that batch's input shapes (for
        torch.compile: the compile and the first run), and ``total``: build plus the first calls
        with every input shape the runner saw (the scoring's batches included). All of it
        happened before any timed call: the scoring or the warm-up calls of the timing made it."""
        out = {}
        for label, run in cand.runners.items():
            if not isinstance(run, Runner):
                continue
            row = {} if run.build_s is None else {"build": round(run.build_s, 4)}
            row["total"] = round((run.build_s or 0.0) + sum(run.setup_s.values()), 4)
            for b in self.measure.batch_sizes:
                first = run.first_call_s(self.task.collate(_batch(self.examples, b)))
                if first is not None:
                    row[str(b)] = round(first, 4)
            out[label] = row
        return out

    @staticmethod
    def _note(cand: Candidate, text: str) -> None:
        if text not in cand.notes:
            cand.notes.append(text)

    def close(self) -> None:
        for c in self.candidates.values():
            c.runners.clear()
            c.states.clear()
        gc.collect()


def _batch(examples: tuple[torch.Tensor, ...], b: int) -> tuple[torch.Tensor, ...]:
    idx = torch.arange(b) % examples[0].shape[0]
    return tuple(t[idx].contiguous() for t in examples)
