"""Runtimes, registered by name: where a saved model runs for measurement and serving.

A runtime is a frozen config (its options, e.g. ONNX Runtime's optimisation level, execution
provider, threads and spinning) plus a builder that turns a loaded model into a runner (see
slimcart.measure.runners: a callable from a tuple of input tensors to numpy outputs that records
its first-call time per input shape and its fallbacks). ``family`` says which model formats it
serves (see slimcart.formats): "torch" for PyTorch modules, "onnxruntime" for ONNX graphs (the
family of every runtime that runs an ONNX file, OpenVINO included; the name is kept because
saved folders hold converted graphs in ``served/onnxruntime/``). Recipes name runtimes in
``measure.runtimes`` as a name or a mapping; the command line also takes ``NAME:key=value,...``
or a YAML mapping::

    runtimes: [torch, onnxruntime, {runtime: onnxruntime, label: ort-basic, optimization: basic},
               {runtime: torch_compile, freezing: true}, openvino]
    slimcart bench FOLDER --runtime torch_compile:mode=max-autotune,freezing=true --runtime openvino

Options are validated without looking at the machine; what the machine lacks (a GPU, a
provider, a compiler) is found when the runner is built and handled there: a fallback with a
one-line notice, or a refusal that says why. The config used is recorded in the result.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from ..errors import UsageError, closest
from ..registry import TORCH_INT8
from . import hardware
from .runners import (CPU_EP, CompiledRunner, OpenVinoRunner, OrtRunner, Runner, RuntimeFallbackWarning,
                      TorchRunner, openvino_pin)

__all__ = ["CompiledRunner", "OpenVinoRunner", "OrtRunner", "Runner", "RuntimeFallbackWarning", "TorchRunner",
           "RuntimeChoice", "get", "parse_choice", "register_runtime", "runtimes", "set_threads"]


def set_threads(n: int | None) -> int:
    if n:
        torch.set_num_threads(n)
    return torch.get_num_threads()


# ---- the registry ------------------------------------------------------------------------------

class RuntimeConfig(BaseModel):
    """Options of one runtime; ``label`` names it in results (default: the runtime's name)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    label: str | None = None

    def memory_probe(self) -> str | None:
        """What the memory probe (slimcart.measure.memory_probe, a fresh process) loads this
        runtime as; None when it cannot reproduce it (then memory is not reported for it)."""
        return None


@dataclass(frozen=True)
class Runtime:
    name: str
    family: str                        # the formats it serves name this family (formats.Format.serves)
    config_cls: type[RuntimeConfig]
    build: Callable[..., Callable]     # (config, state, input_names, threads, deployed) -> runner
    summary: str
    available: Callable[[], str] | None = None   # what this machine offers it, in a few words

    def availability(self) -> str:
        """E.g. "devices: CPU" or "not installed: pip install ..." (for `slimcart runtimes`)."""
        return self.available() if self.available else "-"


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
        """A runner; its ``build_s`` is the seconds this took (loading a session, compiling a graph)."""
        t0 = time.perf_counter()
        run = self.runtime.build(self.config, state, tuple(input_names), threads, deployed)
        if isinstance(run, Runner):
            run.build_s = time.perf_counter() - t0
        return run


def parse_choice(item: Any) -> RuntimeChoice:
    """A runtime name, a mapping ``{runtime: NAME, label: ..., option: value}``, or a string
    ``NAME:key=value,key=value`` / a YAML mapping (command line); ValueError naming what is bad."""
    if isinstance(item, RuntimeChoice):
        return item
    if isinstance(item, str):
        item = _from_string(item)
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
        bad = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'options'}: {e['msg'].removeprefix('Value error, ')}"
                        for e in exc.errors())
        raise ValueError(f"runtime {name!r}: {bad}") from None


def _from_string(text: str) -> str | dict:
    import yaml

    text = text.strip()
    if text.startswith("{"):
        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ValueError(f"runtime {text!r} is not a valid YAML mapping: {str(exc).splitlines()[0]}") from None
    if ":" not in text:
        return text
    name, _, rest = text.partition(":")
    options: dict[str, Any] = {"runtime": name.strip()}
    for part in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = part.partition("=")
        if not eq or not key.strip():
            raise ValueError(f"runtime {text!r}: option {part!r} is not key=value")
        options[key.strip()] = yaml.safe_load(value.strip()) if value.strip() else None
    return options


# ---- PyTorch: eager and torch.compile --------------------------------------------------------

class TorchConfig(RuntimeConfig):
    device: Literal["cpu", "cuda"] = "cpu"
    dtype: Literal["float32", "float16", "bfloat16"] = Field(default="float32", description=(
        "weights and float inputs cast to it; half types on the CPU only where it has native support"))
    threads: int | None = Field(default=None, ge=1, description=(
        "intra-op threads for this runtime's calls (restored after each); None: the measurement's"))
    interop_threads: int | None = Field(default=None, ge=1, description=(
        "process-wide; PyTorch sets it once, before any parallel work (later: kept, with a notice)"))

    def memory_probe(self) -> str | None:
        return "torch" if self.device == "cpu" and self.dtype == "float32" and not self.threads else None


class TorchCompileConfig(TorchConfig):
    mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "default"
    freezing: bool = Field(default=False, description="inductor freezing: weights folded in as constants")
    dynamic: bool | None = Field(default=None, description="None: dynamic after a second shape; True/False: forced")
    fullgraph: bool = Field(default=False, description="fail on a graph break instead of splitting the graph")
    fallback: bool = Field(default=True, description=(
        "if compiling fails: run eager PyTorch with a one-line notice (false: stop with the error)"))

    def memory_probe(self) -> str | None:
        return None


def _torch_options(cfg: TorchConfig, state) -> dict[str, Any]:
    if state.format == TORCH_INT8 and (cfg.device != "cpu" or cfg.dtype != "float32"):
        raise UsageError(f"a quantized PyTorch model runs on the CPU in float32 only, not on device "
                         f"{cfg.device} in {cfg.dtype}.", "Time it with the default device and dtype.")
    return dict(device=cfg.device, dtype=cfg.dtype, threads=cfg.threads, interop_threads=cfg.interop_threads)


def _build_torch(cfg: TorchConfig, state, input_names, threads, deployed):
    return TorchRunner(state.torch_model, **_torch_options(cfg, state))


def _build_torch_compile(cfg: TorchCompileConfig, state, input_names, threads, deployed):
    return CompiledRunner(state.torch_model, mode=cfg.mode, freezing=cfg.freezing, dynamic=cfg.dynamic,
                          fullgraph=cfg.fullgraph, fallback=cfg.fallback, **_torch_options(cfg, state))


def _torch_here() -> str:
    gpus = hardware.cuda_devices()
    return "cpu" + (", cuda: " + ", ".join(d["name"] for d in gpus) if gpus else " (no CUDA device)")


def _compile_here() -> str:
    cxx = hardware.cxx_compiler()
    return (f"yes (C++ compiler {cxx})" if cxx else "no C++ compiler: compiling fails (eager fallback)") + \
        (", cuda" if torch.cuda.is_available() else "")


# ---- ONNX graphs: ONNX Runtime and OpenVINO ----------------------------------------------------

class OrtConfig(RuntimeConfig):
    optimization: Literal["disable", "basic", "extended", "all"] = "all"
    provider: str = Field(default=CPU_EP, description=(
        "an ONNX Runtime execution provider; one not available here falls back to the CPU with a notice"))
    threads: int | None = Field(default=None, ge=1, description="intra-op threads; None: the measurement's")
    inter_threads: int | None = Field(default=None, ge=1, description=(
        "inter-op threads; above 1 runs independent nodes in parallel (ORT_PARALLEL)"))
    spinning: bool = Field(default=False, description=(
        "ONNX Runtime's busy-waiting worker threads; off while variants are timed interleaved"))
    fp16: bool = Field(default=False, description=(
        "convert the graph to float16 (inputs/outputs stay float32); GPU providers only"))

    @field_validator("provider")
    @classmethod
    def _known_provider(cls, value: str) -> str:
        import onnxruntime

        known = onnxruntime.get_all_providers()
        lower = {p.lower(): p for p in known}   # "cuda" and "tensorrtexecutionprovider" are accepted too
        match = lower.get(value.lower()) or lower.get(value.lower() + "executionprovider")
        if match is None:
            raise ValueError(f"unknown execution provider {value!r}.{closest(value, known)} Known: {', '.join(known)}")
        return match

    @field_validator("fp16")
    @classmethod
    def _fp16_needs_gpu(cls, value: bool, info: ValidationInfo) -> bool:
        if value and info.data.get("provider") == CPU_EP:
            raise ValueError("refused on CPUExecutionProvider: its kernels run float32 (ONNX Runtime casts "
                             "back), measured 0.9-1.0x the float32 speed here with up to 9e-3 output error; "
                             "use a GPU provider (CUDAExecutionProvider, TensorrtExecutionProvider)")
        return value

    def memory_probe(self) -> str | None:
        return "onnxruntime" if self.provider == CPU_EP and not self.fp16 else None


def _build_ort(cfg: OrtConfig, state, input_names, threads, deployed):
    if deployed:  # ONNX Runtime as a user runs it: its own thread count and spinning
        return OrtRunner(state.onnx_path, input_names, 0, [cfg.provider], optimization=cfg.optimization,
                         spinning=None, fp16=cfg.fp16)
    return OrtRunner(state.onnx_path, input_names, cfg.threads or threads, [cfg.provider],
                     optimization=cfg.optimization, spinning=cfg.spinning, fp16=cfg.fp16,
                     inter_threads=cfg.inter_threads)


def _ort_here() -> str:
    return "providers: " + ", ".join(p.removesuffix("ExecutionProvider") for p in hardware.ort_providers())


class OpenVinoConfig(RuntimeConfig):
    device: str = Field(default="CPU", pattern=r"^[A-Z]+(\.[0-9]+)?([:,][A-Z0-9.,]+)?$", description=(
        "an OpenVINO device (CPU, GPU, GPU.1, NPU, AUTO); one not available here falls back to CPU"))
    hint: Literal["LATENCY", "THROUGHPUT", "CUMULATIVE_THROUGHPUT"] = "LATENCY"
    threads: int | None = Field(default=None, ge=1, description="INFERENCE_NUM_THREADS; None: the measurement's")
    num_streams: int | None = Field(default=None, ge=1, description="NUM_STREAMS; None: what the hint chooses")
    precision: Literal["f32", "bf16", "f16", "default"] = Field(default="f32", description=(
        "INFERENCE_PRECISION_HINT; default: the device's own (bf16 on CPUs with AMX/AVX512-BF16, f16 on GPUs)"))
    pinning: bool = Field(default=False, description=(
        "ENABLE_CPU_PINNING (OpenVINO's default: on); off while variants are timed interleaved, where "
        "threads pinned to cores fought PyTorch's for them"))

    @field_validator("device", "hint", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value


def _build_openvino(cfg: OpenVinoConfig, state, input_names, threads, deployed):
    props: dict[str, Any] = {"PERFORMANCE_HINT": cfg.hint}
    if not deployed:  # as deployed: OpenVINO's own thread count and pinning
        props["INFERENCE_NUM_THREADS"] = cfg.threads or threads
        props["ENABLE_CPU_PINNING"] = cfg.pinning
    if cfg.num_streams:
        props["NUM_STREAMS"] = cfg.num_streams
    if cfg.precision != "default":
        props["INFERENCE_PRECISION_HINT"] = cfg.precision
    return OpenVinoRunner(state.onnx_path, input_names, cfg.device, props)


def _openvino_here() -> str:
    devices = hardware.openvino_devices()
    return f"not installed: pip install {openvino_pin()}" if devices is None else "devices: " + ", ".join(devices)


register_runtime(Runtime("torch", "torch", TorchConfig, _build_torch,
                         "PyTorch eager, inference mode: device, dtype, threads", _torch_here))
register_runtime(Runtime("torch_compile", "torch", TorchCompileConfig, _build_torch_compile,
                         "torch.compile (inductor): mode, freezing, dynamic shapes; compiles on the first "
                         "call per input shape (reported as setup time)", _compile_here))
register_runtime(Runtime("onnxruntime", "onnxruntime", OrtConfig, _build_ort,
                         "ONNX Runtime: optimisation level, execution provider, fp16, threads, spinning", _ort_here))
register_runtime(Runtime("openvino", "onnxruntime", OpenVinoConfig, _build_openvino,
                         "OpenVINO on the ONNX graph: device, performance hint, threads, streams, precision",
                         _openvino_here))
