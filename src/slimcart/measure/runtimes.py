"""Runtimes, registered by name: where a saved model runs for measurement and serving.

A runtime is a frozen config (its options, e.g. ONNX Runtime's optimisation level, execution
provider, threads and spinning) plus a builder that turns a loaded model into a runner: a callable
from a tuple of input tensors to numpy outputs. ``family`` says which model formats it serves
(see slimcart.formats). Recipes name runtimes in ``measure.runtimes`` as a name or a mapping::

    runtimes: [torch, onnxruntime, {runtime: onnxruntime, label: ort-basic, optimization: basic}]

The config used is recorded in the result. Adding torch.compile or a GPU provider is one new
``register_runtime`` call.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..errors import UsageError, closest


def set_threads(n: int | None) -> int:
    if n:
        torch.set_num_threads(n)
    return torch.get_num_threads()


class TorchRunner:
    runtime = "torch"

    def __init__(self, model: torch.nn.Module):
        self.model = model.eval()

    def __call__(self, inputs: tuple[torch.Tensor, ...]) -> np.ndarray:
        with torch.inference_mode():
            return self.model(*inputs).float().numpy()


class OrtRunner:
    runtime = "onnxruntime"

    def __init__(self, path: Path, input_names: tuple[str, ...], threads: int | None = None,
                 providers: list[str] | None = None, *, optimization: str = "all",
                 spinning: bool | None = False):
        """``spinning=None`` keeps ONNX Runtime's default (worker threads busy-wait after a run);
        ``threads=0`` keeps its default thread count."""
        import onnxruntime as ort

        from ..errors import ModelError

        opts = ort.SessionOptions()
        if threads != 0:
            opts.intra_op_num_threads = threads or torch.get_num_threads()
            opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        opts.graph_optimization_level = OPT_LEVELS[optimization]
        # ONNX Runtime's worker threads busy-wait after each run by default; with variants timed
        # interleaved in one process, that spinning steals the cores from the next (PyTorch) run
        # and inflated eager latencies ~3x in a measurement here. Passive waiting keeps it fair.
        if spinning is not None:
            opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=providers or ["CPUExecutionProvider"])
        except Exception as exc:  # ONNX Runtime raises its own types for damaged or unsupported graphs
            raise ModelError(f"ONNX Runtime cannot open {path}: {str(exc)[:300]}",
                             "The file is damaged or uses operators this ONNX Runtime lacks.") from None
        self.providers = self.session.get_providers()
        wanted = {i.name for i in self.session.get_inputs()}
        self.input_names = tuple(input_names)
        self.used = [n in wanted for n in self.input_names]

    def __call__(self, inputs: tuple[torch.Tensor, ...]) -> np.ndarray:
        feed = {n: t.numpy() for n, t, u in zip(self.input_names, inputs, self.used) if u}
        return self.session.run(None, feed)[0]


def _ort_levels() -> dict[str, Any]:
    import onnxruntime as ort

    g = ort.GraphOptimizationLevel
    return {"disable": g.ORT_DISABLE_ALL, "basic": g.ORT_ENABLE_BASIC, "extended": g.ORT_ENABLE_EXTENDED,
            "all": g.ORT_ENABLE_ALL}


class _Levels(dict):
    def __missing__(self, key):
        self.update(_ort_levels())
        return dict.__getitem__(self, key)


OPT_LEVELS = _Levels()


# ---- the registry ------------------------------------------------------------------------------

class RuntimeConfig(BaseModel):
    """Options of one runtime; ``label`` names it in results (default: the runtime's name)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    label: str | None = None


class TorchConfig(RuntimeConfig):
    pass


class OrtConfig(RuntimeConfig):
    optimization: Literal["disable", "basic", "extended", "all"] = "all"
    provider: str = "CPUExecutionProvider"
    threads: int | None = Field(default=None, ge=1, description="None: the measurement's thread count")
    spinning: bool = Field(default=False, description=(
        "ONNX Runtime's busy-waiting worker threads; off while variants are timed interleaved"))


@dataclass(frozen=True)
class Runtime:
    name: str
    family: str                        # the formats it serves name this family (formats.Format.serves)
    config_cls: type[RuntimeConfig]
    build: Callable[..., Callable]     # (config, state, input_names, threads, deployed) -> runner
    summary: str


_RUNTIMES: dict[str, Runtime] = {}


def register_runtime(rt: Runtime) -> Runtime:
    _RUNTIMES[rt.name] = rt
    return rt


def runtimes() -> dict[str, Runtime]:
    return dict(_RUNTIMES)


def get(name: str) -> Runtime:
    if name not in _RUNTIMES:
        raise UsageError(f"Unknown runtime {name!r}.{closest(str(name), list(_RUNTIMES))}",
                         f"Known runtimes: {', '.join(_RUNTIMES)}.")
    return _RUNTIMES[name]


@dataclass(frozen=True)
class RuntimeChoice:
    """A runtime with its options, as named in a recipe."""

    runtime: Runtime
    config: RuntimeConfig

    @property
    def label(self) -> str:
        return self.config.label or self.runtime.name

    def record(self) -> dict[str, Any]:
        return {"runtime": self.runtime.name, **self.config.model_dump(mode="json"), "label": self.label}

    def runner(self, state, input_names: tuple[str, ...], threads: int, deployed: bool = False) -> Callable:
        return self.runtime.build(self.config, state, tuple(input_names), threads, deployed)


def parse_choice(item: Any) -> RuntimeChoice:
    """A runtime name or a mapping ``{runtime: NAME, label: ..., option: value}``; ValueError if bad."""
    if isinstance(item, RuntimeChoice):
        return item
    if isinstance(item, str):
        name, options = item, {}
    elif isinstance(item, dict) and isinstance(item.get("runtime"), str):
        name, options = item["runtime"], {k: v for k, v in item.items() if k != "runtime"}
    else:
        raise ValueError("each runtime is a name or a mapping with a 'runtime' key, got " + repr(item))
    if name not in _RUNTIMES:
        raise ValueError(f"unknown runtime {name!r}.{closest(name, list(_RUNTIMES))} Known: {', '.join(_RUNTIMES)}")
    rt = _RUNTIMES[name]
    try:
        return RuntimeChoice(rt, rt.config_cls.model_validate(options))
    except ValidationError as exc:
        bad = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise ValueError(f"runtime {name!r}: {bad}") from None


def _build_torch(cfg: TorchConfig, state, input_names, threads, deployed):
    return TorchRunner(state.torch_model)


def _build_ort(cfg: OrtConfig, state, input_names, threads, deployed):
    if deployed:  # ONNX Runtime as a user runs it: its own thread count and spinning
        return OrtRunner(state.onnx_path, input_names, 0, [cfg.provider], optimization=cfg.optimization,
                         spinning=None)
    return OrtRunner(state.onnx_path, input_names, cfg.threads or threads, [cfg.provider],
                     optimization=cfg.optimization, spinning=cfg.spinning)


register_runtime(Runtime("torch", "torch", TorchConfig, _build_torch, "PyTorch eager, inference mode"))
register_runtime(Runtime("onnxruntime", "onnxruntime", OrtConfig, _build_ort,
                         "ONNX Runtime: optimisation level, execution provider, threads, spinning"))
