"""Runners: a loaded model in one runtime, as a callable from a tuple of input tensors to numpy
outputs. Each runner records the wall time of its first call per input-shape signature
(``setup_s``: a compile for torch.compile, kernel and graph preparation elsewhere), and, in
``notes``, every fallback it took (a provider or device not available here, a failed compile),
also warned as ``RuntimeFallbackWarning``. Their options come from slimcart.measure.runtimes."""
from __future__ import annotations

import copy
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from ..errors import ModelError, UsageError
from . import hardware

CPU_EP = "CPUExecutionProvider"


class RuntimeFallbackWarning(UserWarning):
    """A runtime could not do what was asked and did something else (said in one line)."""


def signature(inputs: tuple[torch.Tensor, ...]) -> tuple:
    return tuple(t.shape for t in inputs)


class Runner:
    runtime = ""

    def __init__(self):
        self.setup_s: dict[tuple, float] = {}   # input shapes -> seconds of the first call with them
        self.build_s: float | None = None       # seconds to build the runner (set by RuntimeChoice)
        self.notes: list[str] = []

    def __call__(self, inputs: tuple[torch.Tensor, ...]) -> np.ndarray:
        key = signature(inputs)
        if key in self.setup_s:
            return self._run(inputs)
        t0 = time.perf_counter()
        out = self._first(inputs)
        self.setup_s[key] = time.perf_counter() - t0
        return out

    def first_call_s(self, inputs: tuple[torch.Tensor, ...]) -> float | None:
        return self.setup_s.get(signature(inputs))

    def _first(self, inputs):
        return self._run(inputs)

    def _run(self, inputs) -> np.ndarray:
        raise NotImplementedError

    def notice(self, text: str) -> None:
        self.notes.append(text)
        warnings.warn(f"{self.runtime}: {text}", RuntimeFallbackWarning, stacklevel=3)


# ---- PyTorch ----------------------------------------------------------------------------------

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Measured here (AMD EPYC, AVX2 only, 2 threads): PyTorch emulates half types without native
# support, 13-15x slower than float32 (CNN b=32: 27 ms fp32, 395 ms fp16, 465 ms bf16).
_SLOW_HALF = "without native support PyTorch emulates it, 13-15x slower than float32 (measured on an AVX2 CPU)"


class TorchRunner(Runner):
    """PyTorch eager in inference mode, on ``device`` in ``dtype`` (weights and float inputs cast;
    the model is copied first when either changes). ``threads``: intra-op threads for this
    runner's calls only (restored after each call); ``interop_threads`` is process-wide and can
    be set once, before any parallel work: if that is too late it stays as it is, with a notice."""

    runtime = "torch"

    def __init__(self, model: torch.nn.Module, *, device: str = "cpu", dtype: str = "float32",
                 threads: int | None = None, interop_threads: int | None = None):
        super().__init__()
        if device == "cuda" and not torch.cuda.is_available():
            self.notice("device cuda not available here (torch.cuda.is_available() is False); running on the CPU")
            device = "cpu"
        if device == "cpu" and dtype == "bfloat16" and not hardware.has_cpu_feature(*hardware.BF16_FEATURES):
            raise UsageError(f"{self.runtime}: dtype bfloat16 is refused on this CPU: it reports none of "
                             f"{', '.join(hardware.BF16_FEATURES)}, and {_SLOW_HALF}.",
                             "Use dtype float32 on this machine, or device cuda on a GPU.")
        if device == "cpu" and dtype == "float16" and not hardware.has_cpu_feature(*hardware.FP16_FEATURES):
            raise UsageError(f"{self.runtime}: dtype float16 is refused on this CPU: it reports none of "
                             f"{', '.join(hardware.FP16_FEATURES)}, and {_SLOW_HALF}.",
                             "Use dtype float32 on this machine, or device cuda on a GPU.")
        self.device, self.dtype = torch.device(device), DTYPES[dtype]
        if device != "cpu" or dtype != "float32":
            model = copy.deepcopy(model).to(device=self.device, dtype=self.dtype)
        self.model = model.eval()
        self.threads = threads
        if interop_threads and interop_threads != torch.get_num_interop_threads():
            try:
                torch.set_num_interop_threads(interop_threads)
            except RuntimeError:
                self.notice(f"interop_threads={interop_threads} not applied: PyTorch sets it once per process, "
                            f"before any parallel work; it stays {torch.get_num_interop_threads()}")

    def _forward(self, inputs):
        if self.device.type != "cpu" or self.dtype != torch.float32:
            inputs = tuple(t.to(self.device, self.dtype if t.is_floating_point() else t.dtype) for t in inputs)
        with torch.inference_mode():
            return self.model(*inputs).float().cpu().numpy()

    def _run(self, inputs):
        if self.threads and self.threads != torch.get_num_threads():
            before = torch.get_num_threads()
            torch.set_num_threads(self.threads)
            try:
                return self._forward(inputs)
            finally:
                torch.set_num_threads(before)
        return self._forward(inputs)


class CompiledRunner(TorchRunner):
    """torch.compile (inductor). Compilation is lazy: it happens on the first call with each new
    input-shape signature (recorded in ``setup_s``). ``freezing`` sets inductor's global
    ``freezing`` flag only around those calls (weights become constants of the graph); calls
    with shapes already seen run the compiled code without touching any global. If compiling
    fails (no C++ compiler, an unsupported operator) and ``fallback`` is on, the runner runs
    eager PyTorch from then on, with a one-line notice; otherwise it raises a UsageError."""

    runtime = "torch_compile"

    def __init__(self, model: torch.nn.Module, *, mode: str = "default", freezing: bool = False,
                 dynamic: bool | None = None, fullgraph: bool = False, fallback: bool = True, **torch_options):
        super().__init__(model, **torch_options)
        import torch._dynamo.config as dynamo_config

        # every model compiled in one process adds cache entries to the same forward code (one
        # per shape family and model); past the limit (8) Dynamo silently runs eager
        if dynamo_config.recompile_limit < 64:
            dynamo_config.recompile_limit = 64
        self.eager, self.freezing, self.fallback = self.model, freezing, fallback
        if freezing:  # in the options too: Dynamo reuses a graph compiled with equal options only, so a
            # graph compiled earlier for this model without freezing is not taken for a frozen one
            from torch._inductor import list_mode_options

            self.model = torch.compile(self.eager, options={**list_mode_options(mode, dynamic), "freezing": True},
                                       dynamic=dynamic, fullgraph=fullgraph)
        else:
            self.model = torch.compile(self.eager, mode=None if mode == "default" else mode, dynamic=dynamic,
                                       fullgraph=fullgraph)

    def _first(self, inputs):
        import torch._inductor.config as inductor_config

        try:
            with inductor_config.patch(freezing=self.freezing):
                return self._run(inputs)
        except Exception as exc:  # inductor/dynamo raise many types (BackendCompilerFailed, Unsupported, ...)
            reason = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:200]}"
            if self.model is self.eager or not self.fallback:
                if self.model is self.eager:
                    raise
                raise UsageError(f"torch_compile: compiling the model failed ({reason}).",
                                 "Set fallback: true to time eager PyTorch instead, or use runtime torch.") from None
            self.notice(f"compiling failed ({reason}); running eager PyTorch instead")
            self.model = self.eager
            return self._run(inputs)


# ---- ONNX Runtime ----------------------------------------------------------------------------

# ONNX model metadata: comma-separated ONNX Runtime graph optimizers that every session on the model
# keeps off (written by ort_transformer_optimize with skip_layer_norm: false)
DISABLED_OPTIMIZERS_KEY = "slimcart.ort.disabled_optimizers"


def _ort_levels():
    import onnxruntime as ort

    g = ort.GraphOptimizationLevel
    return {"disable": g.ORT_DISABLE_ALL, "basic": g.ORT_ENABLE_BASIC, "extended": g.ORT_ENABLE_EXTENDED,
            "all": g.ORT_ENABLE_ALL}


class OrtRunner(Runner):
    runtime = "onnxruntime"

    def __init__(self, path: Path, input_names: tuple[str, ...], threads: int | None = None,
                 providers: list[str] | None = None, *, optimization: str = "all",
                 spinning: bool | None = False, fp16: bool = False, inter_threads: int | None = None):
        """``spinning=None`` keeps ONNX Runtime's default (worker threads busy-wait after a run);
        ``threads=0`` keeps its default thread count. A provider not available here falls back
        to the CPU with a notice; ``fp16`` converts the graph to float16 (inputs and outputs kept
        float32) and is dropped, with a notice, when the CPU provider ends up serving it."""
        super().__init__()
        import onnxruntime as ort

        self.disabled_optimizers: list[str] = []
        opts = ort.SessionOptions()
        if threads != 0:
            opts.intra_op_num_threads = threads or torch.get_num_threads()
            opts.inter_op_num_threads = inter_threads or 1
        if inter_threads and inter_threads > 1:
            opts.execution_mode = ort.ExecutionMode.ORT_PARALLEL
        opts.log_severity_level = 3
        opts.graph_optimization_level = _ort_levels()[optimization]
        # ONNX Runtime's worker threads busy-wait after each run by default; with variants timed
        # interleaved in one process, that spinning steals the cores from the next (PyTorch) run
        # and inflated eager latencies ~3x in a measurement here. Passive waiting keeps it fair.
        if spinning is not None:
            opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
        providers = self._providers(list(providers or [CPU_EP]), ort.get_available_providers())
        if fp16 and providers[0] == CPU_EP:
            self.notice("fp16 dropped: the CPU provider has no gain from it (ONNX Runtime casts back to "
                        "float32; 0.9-1.0x the float32 speed measured here); running float32")
            fp16 = False
        model = _fp16_graph(path) if fp16 else str(path)
        try:
            self.session = ort.InferenceSession(model, opts, providers=providers)
            off = self.session.get_modelmeta().custom_metadata_map.get(DISABLED_OPTIMIZERS_KEY, "")
            if off:  # the graph asks for some of ONNX Runtime's own fusions to stay off
                self.disabled_optimizers = [o.strip() for o in off.split(",") if o.strip()]
                self.session = ort.InferenceSession(model, opts, providers=providers,
                                                    disabled_optimizers=self.disabled_optimizers)
        except Exception as exc:  # ONNX Runtime raises its own types for damaged or unsupported graphs
            raise ModelError(f"ONNX Runtime cannot open {path}: {str(exc)[:300]}",
                             "The file is damaged or uses operators this ONNX Runtime lacks.") from None
        self.providers = self.session.get_providers()
        if self.providers[0] != providers[0]:
            self.notice(f"{providers[0]} could not be started (ONNX Runtime's log says why); "
                        f"running on {self.providers[0]}")
        wanted = {i.name for i in self.session.get_inputs()}
        self.input_names = tuple(input_names)
        self.used = [n in wanted for n in self.input_names]

    def _providers(self, wanted: list[str], available: list[str]) -> list[str]:
        kept = [p for p in wanted if p in available]
        if kept and kept[0] == "TensorrtExecutionProvider" and "CUDAExecutionProvider" in available \
                and "CUDAExecutionProvider" not in kept:
            kept.insert(1, "CUDAExecutionProvider")   # TensorRT hands the nodes it cannot run to CUDA
        kept += [CPU_EP] if CPU_EP not in kept else []
        missing = [p for p in wanted if p not in available]
        if missing:
            short = ", ".join(p.removesuffix("ExecutionProvider") for p in available)
            self.notice(f"{', '.join(missing)} not available here (ONNX Runtime has {short}); running on {kept[0]}")
        return kept

    def _run(self, inputs):
        feed = {n: t.numpy() for n, t, u in zip(self.input_names, inputs, self.used) if u}
        return self.session.run(None, feed)[0]


def _fp16_graph(path: Path) -> bytes:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    try:
        graph = convert_float_to_float16(onnx.load(str(path)), keep_io_types=True)
    except Exception as exc:  # the converter raises plain errors on graphs it cannot handle
        raise ModelError(f"Cannot convert {path} to float16: {type(exc).__name__}: {str(exc)[:200]}",
                         "fp16 applies to float graphs; drop fp16 for quantized ones.") from None
    return graph.SerializeToString()


# ---- OpenVINO --------------------------------------------------------------------------------

def openvino_pin() -> str:
    """The openvino requirement slimcart declares (for the install hint)."""
    from importlib import metadata

    try:
        return next(r.split(";")[0].strip() for r in metadata.requires("slimcart") or []
                    if r.lower().startswith("openvino"))
    except (metadata.PackageNotFoundError, StopIteration):
        return "openvino"


CPU_ONLY = ("INFERENCE_NUM_THREADS", "ENABLE_CPU_PINNING")   # properties other devices reject


class OpenVinoRunner(Runner):
    """An ONNX graph compiled by OpenVINO for ``device`` (dynamic input dimensions stay dynamic);
    one infer request, called synchronously. ``properties``: OpenVINO compile properties
    (PERFORMANCE_HINT, INFERENCE_NUM_THREADS, NUM_STREAMS, INFERENCE_PRECISION_HINT)."""

    runtime = "openvino"

    def __init__(self, path: Path, input_names: tuple[str, ...], device: str = "CPU",
                 properties: dict | None = None):
        super().__init__()
        try:
            core = hardware.openvino_core()
        except ImportError:
            raise UsageError(f"runtime openvino is not installed: pip install {openvino_pin()}") from None
        if not any(d == device or d.split(".")[0] == device for d in core.available_devices):
            self.notice(f"device {device} not available here (OpenVINO has {', '.join(core.available_devices)}); "
                        "running on CPU")
            device = "CPU"
        properties = dict(properties or {})
        if device != "CPU":
            for key in CPU_ONLY:
                properties.pop(key, None)
        try:
            model = core.read_model(str(path))
            compiled = core.compile_model(model, device, properties)
        except RuntimeError as exc:  # OpenVINO reports unsupported graphs and bad properties this way
            msg = " ".join(l for l in str(exc).splitlines() if l.strip() and not l.startswith("Exception from"))
            raise ModelError(f"OpenVINO cannot compile {path} for {device}: {msg[:300]}") from None
        self.device, self.compiled = device, compiled
        self.request = compiled.create_infer_request()
        self.output = compiled.output(0)
        wanted = {n for i in model.inputs for n in i.get_names()}
        self.input_names = tuple(input_names)
        self.used = [n in wanted for n in self.input_names]

    def _run(self, inputs):
        feed = {n: t.numpy() for n, t, u in zip(self.input_names, inputs, self.used) if u}
        # inputs wrapped, not copied (~45 us less per call measured here); outputs copied, since
        # the request reuses its buffers
        return self.request.infer(feed, share_inputs=True)[self.output]
