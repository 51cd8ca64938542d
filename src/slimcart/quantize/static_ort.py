"""Static INT8 of an ONNX graph with ONNX Runtime's quantizer, calibrated on the task's own data.

The graph gets QuantizeLinear/DequantizeLinear pairs (QDQ format) around the chosen ops, with
per-channel int8 weights and per-tensor activation ranges measured on ``calibration_size`` rows;
ONNX Runtime then fuses each DQ -> op -> Q group into an integer kernel (QLinearConv, QGemm,
QLinearMatMul, QLinearAdd, ...) when it builds a session. Unlike dynamic INT8, activations are
not re-quantized per batch, which is what makes the CNN faster instead of slower. The activation
and weight types and ``reduce_range`` default to what this CPU's int8 kernels need
(``int8_features``): on AVX2 without VNNI, 8-bit weights overflow 16-bit sums.
"""
from __future__ import annotations

import collections
import contextlib
import fnmatch
import logging
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
from pydantic import Field

from ..errors import DataError, ModelError, UsageError
from ..registry import ONNX, TechniqueConfig, register
from ..stage import ModelState, StageContext, StageReport
from . import int8_features

OP_TYPES = ("Conv", "ConvTranspose", "Gemm", "MatMul", "Add", "Mul", "Relu", "Clip", "MaxPool", "AveragePool",
            "GlobalAveragePool", "Flatten", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Concat", "Resize",
            "Pad", "Split", "Gather", "Softmax", "Where", "LayerNormalization", "Sigmoid")
HEAVY = ("Conv", "ConvTranspose", "Gemm", "MatMul", "Attention")  # reported even when not in op_types
INTEGER_OPS = ("QLinearConv", "QGemm", "QLinearMatMul", "QLinearAdd", "QLinearMul", "QLinearGlobalAveragePool",
               "QLinearAveragePool", "QLinearConcat", "QLinearSoftmax", "QLinearSigmoid", "QLinearLeakyRelu",
               "MatMulIntegerToFloat", "ConvInteger", "MatMulInteger", "QAttention", "DynamicQuantizeMatMul")
NP_TYPES = {onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.INT64: np.int64, onnx.TensorProto.INT32: np.int32,
            onnx.TensorProto.FLOAT16: np.float16, onnx.TensorProto.DOUBLE: np.float64,
            onnx.TensorProto.BOOL: np.bool_, onnx.TensorProto.UINT8: np.uint8, onnx.TensorProto.INT8: np.int8}
Auto = Literal["auto"]


class OrtInt8StaticConfig(TechniqueConfig):
    calibration: str = "train"                       # the task split the ranges are measured on
    calibration_size: int = Field(default=512, ge=1)  # rows (a shuffled sample of the split)
    calibration_batch: int = Field(default=64, ge=1)
    calibrate_method: Literal["minmax", "entropy", "percentile"] = "minmax"
    percentile: float = Field(default=99.999, gt=50, le=100)  # for calibrate_method: percentile
    num_bins: int | None = Field(default=None, ge=256)  # histogram bins; None: 2048 percentile, 512 entropy
    activation_type: Auto | Literal["uint8", "int8"] = "auto"  # auto: what this CPU needs (int8_features)
    weight_type: Auto | Literal["int8", "uint8"] = "auto"
    reduce_range: Auto | bool = "auto"               # 7-bit weights
    per_channel: bool = True
    op_types: list[str] = ["Conv", "Gemm", "MatMul", "Add", "Relu", "GlobalAveragePool", "MaxPool",
                           "AveragePool", "Flatten"]
    matmul_const_b_only: bool = False                # quantize only MatMuls with a constant weight
    exclude: list[str] = []                          # node-name patterns (fnmatch) kept in float
    preprocess: bool = True                          # ONNX Runtime's shape inference + clean-up first
    parity_batch: int = Field(default=256, ge=1)     # val rows: quantized vs float graph

    def model_post_init(self, _ctx) -> None:
        bad = [o for o in self.op_types if o not in OP_TYPES]
        if bad:
            raise ValueError(f"op types {bad} cannot be statically quantized here; choose from {list(OP_TYPES)}")


def resolve_scheme(activation_type: str, weight_type: str, reduce_range, report: StageReport) -> dict:
    """int8_features.choose, recorded in the report (stats and a note)."""
    chosen, stats, note = int8_features.choose(activation_type, weight_type, reduce_range)
    report.stats.update(stats)
    report.notes.append(note)
    return chosen


def preprocess(src: Path, out: Path, report: StageReport) -> Path:
    """ONNX Runtime's quantization pre-processing (symbolic shape inference, then ONNX's)."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    out, src = out.resolve(), Path(src).resolve()
    # the pre-processor writes temporary models into the current directory: keep them in the work folder
    with contextlib.chdir(out.parent):
        try:
            quant_pre_process(str(src), str(out), skip_symbolic_shape=False)
            report.stats["preprocess"] = "symbolic shape inference + optimization"
        except Exception as exc:  # symbolic inference gives up on some graphs (e.g. BERT masks)
            try:
                quant_pre_process(str(src), str(out), skip_symbolic_shape=True)
            except Exception as again:  # the pre-processor raises bare exceptions
                raise ModelError(f"ONNX Runtime's quantization pre-processing failed on {src.name}: "
                                 f"{type(again).__name__}: {str(again)[:300]}",
                                 "Set preprocess: false in the stage to quantize the graph as it is.") from None
            report.stats["preprocess"] = f"ONNX shape inference only (symbolic failed: {str(exc)[:200]})"
    return out


def graph_inputs(path: Path) -> list[tuple[str, type, list]]:
    """(name, numpy dtype, dims with int or symbolic entries) of each graph input."""
    g = onnx.load(str(path), load_external_data=False).graph
    inits = {t.name for t in g.initializer}
    out = []
    for i in g.input:
        if i.name in inits:
            continue
        t = i.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in t.shape.dim]
        out.append((i.name, NP_TYPES.get(t.elem_type), dims))
    return out


def check_feed(feed: dict[str, np.ndarray], specs: list[tuple[str, type, list]], where: str) -> None:
    """A DataError naming the input when a batch does not fit the graph or is not finite."""
    for name, dtype, dims in specs:
        a = feed[name]
        want = "(" + ", ".join(str(d) for d in dims) + ")"
        if a.ndim != len(dims) or any(isinstance(d, int) and d > 0 and d != s for d, s in zip(dims, a.shape)):
            raise DataError(f"{where}: input {name!r} has shape {tuple(a.shape)}; the model takes {want}.",
                            "Calibrate on data of the task the model was exported for.")
        if dtype is not None and a.dtype != dtype:
            raise DataError(f"{where}: input {name!r} is {a.dtype}; the model takes {np.dtype(dtype)}.",
                            "Calibrate on data of the task the model was exported for.")
        if np.issubdtype(a.dtype, np.floating) and not np.isfinite(a).all():
            bad = int((~np.isfinite(a)).sum())
            raise DataError(f"{where}: input {name!r} holds {bad} NaN or infinite values.",
                            "Clean the data (or pick another split) before calibrating.")


class TaskCalibrationReader:
    """ONNX Runtime's CalibrationDataReader over ``task.batches``: feeds named like the graph's inputs."""

    def __init__(self, task, path: Path, split: str, rows: int, batch: int):
        if split not in task.splits:
            raise UsageError(f"ort_int8_static.calibration: the task has no split {split!r}.",
                             f"Splits: {', '.join(task.splits)}.")
        self.specs = graph_inputs(path)
        names = list(task.input_names)
        missing = [n for n, _, _ in self.specs if n not in names]
        if missing:
            raise ModelError(f"The ONNX graph takes inputs {missing} that task {task.name!r} does not provide "
                             f"(it provides {names}).", "Export the model with this task's input names.")
        self.index = {n: names.index(n) for n, _, _ in self.specs}
        self.batches = task.batches(split, batch, shuffle=True, seed=0, limit=rows)
        self.split, self.rows, self.count = split, 0, 0
        self.ahead = next(self.batches, None)  # one batch ahead, so that ``done`` is known

    @property
    def done(self) -> bool:
        return self.ahead is None

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.ahead is None:
            return None
        x, self.ahead = self.ahead, next(self.batches, None)
        feed = {n: x[0][i].numpy() for n, i in self.index.items()}
        self.count += 1
        check_feed(feed, self.specs, f"calibration batch {self.count} of split {self.split!r}")
        self.rows += int(next(iter(feed.values())).shape[0])
        return feed

    def chunk(self, batches: int):
        """A reader over the next ``batches`` batches (ONNX Runtime's calibrators hold every
        intermediate output of the batches one ``collect_data`` call sees)."""
        outer = self

        class Chunk:
            left = batches

            def get_next(self):
                if self.left == 0:
                    return None
                self.left -= 1
                return outer.get_next()

        return Chunk()


def calibrate(src: Path, reader: TaskCalibrationReader, cfg: OrtInt8StaticConfig, symmetric: bool,
              cache: Path):
    """Activation ranges by ``cfg.calibrate_method``, written to ``cache`` for quantize_static.
    Calibrating here rather than inside quantize_static lets the histogram methods get more bins
    (quantize_static keeps entropy at 128 bins = 128 quantized bins, which makes it minmax again)
    and lets the data pass in chunks."""
    import io
    import tempfile

    from onnxruntime.quantization.calibrate import CalibrationMethod, create_calibrator, save_tensors_data

    method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
              "percentile": CalibrationMethod.Percentile}[cfg.calibrate_method]
    # entropy tries every threshold between 128 and num_bins / 2 bins, in Python: 512 bins keeps it to seconds
    opts = {"minmax": {},
            "entropy": {"num_bins": cfg.num_bins or 512, "num_quantized_bins": 128, "symmetric": symmetric},
            "percentile": {"num_bins": cfg.num_bins or 2048, "percentile": cfg.percentile, "symmetric": symmetric}}
    with tempfile.TemporaryDirectory(prefix="slimcart-calib.") as tmp, \
            contextlib.redirect_stdout(io.StringIO()):  # the histogram calibrators print progress
        calibrator = create_calibrator(Path(src), list(cfg.op_types), augmented_model_path=f"{tmp}/augmented.onnx",
                                       calibrate_method=method, extra_options=opts[cfg.calibrate_method])
        while not reader.done:  # histograms stack the arrays of a chunk: one batch each (shapes may vary)
            calibrator.collect_data(reader.chunk(4 if cfg.calibrate_method == "minmax" else 1))
        save_tensors_data(calibrator.compute_data(), cache)
    return method


def ort_graph(path: Path, out: Path) -> onnx.GraphProto:
    """The graph ONNX Runtime runs after its portable ('extended') optimizations: QDQ groups fused."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    opts.optimized_model_filepath = str(out)
    opts.log_severity_level = 3
    try:
        ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ONNX Runtime raises its own types for graphs it cannot load
        raise ModelError(f"ONNX Runtime cannot load the quantized graph {path.name}: {str(exc)[:300]}") from None
    return onnx.load(str(out)).graph


def integer_counts(graph: onnx.GraphProto) -> dict[str, int]:
    counts = collections.Counter(n.op_type for n in graph.node)
    return {k: v for k, v in sorted(counts.items()) if k in INTEGER_OPS}


def float_parity(task, before: Path, after: Path, rows: int) -> dict:
    """Outputs of the quantized graph against the float one on ``rows`` validation rows."""
    from ..measure.runtimes import OrtRunner

    split = "val" if len(task.splits.get("val", ())) else "test"
    x = task.example_inputs(rows, split)
    ref = OrtRunner(before, task.input_names)(x)
    got = OrtRunner(after, task.input_names)(x)
    err = float(np.abs(got - ref).max())
    out = {"parity_reference": "the float ONNX graph", "parity_rows": int(ref.shape[0]), "parity_split": split,
           "max_abs_error": err, "max_rel_error": err / max(float(np.abs(ref).max()), 1e-12)}
    if hasattr(task, "agreement"):
        out.update({f"agreement_{k}": v for k, v in task.agreement(ref, got).items()})
    return out


def _skip_reason(node: onnx.NodeProto, cfg: OrtInt8StaticConfig, excluded: set[str], consts: set[str],
                 floats: set[str]) -> str:
    if node.name in excluded:
        return "excluded by pattern"
    if node.op_type not in cfg.op_types:
        return f"{node.op_type} is not in op_types"
    if node.op_type == "MatMul" and cfg.matmul_const_b_only and node.input[1] not in consts:
        return "MatMul of two activations (matmul_const_b_only)"
    if node.input and node.input[0] not in floats:
        return f"{node.op_type} of an integer tensor (shape or index arithmetic): nothing to quantize"
    return f"{node.op_type}: left in float by the quantizer (no quantized input to pair it with)"


def _float_tensors(g: onnx.GraphProto) -> set[str]:
    """Names of the tensors shape inference found to be float (unknown ones count as float)."""
    known = {v.name: v.type.tensor_type.elem_type for v in [*g.value_info, *g.input, *g.output]}
    known.update({t.name: t.data_type for t in g.initializer})
    names = {i for n in g.node for i in n.input} | set(known)
    floating = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, 0)
    return {n for n in names if known.get(n, 0) in floating}


def describe_nodes(report: StageReport, cfg: OrtInt8StaticConfig, before: onnx.GraphProto, qdq: onnx.GraphProto,
                   fused: onnx.GraphProto, excluded: set[str], weight_bits: str) -> None:
    """changed/skipped per node of the op types in scope (and every heavy op): what ONNX Runtime runs."""
    dq_out = {o for n in qdq.node if n.op_type == "DequantizeLinear" for o in n.output}
    fused_dq = {o for n in fused.node if n.op_type == "DequantizeLinear" for o in n.output}
    qdq_nodes = {n.name: n for n in qdq.node}
    ran = {n.name: n for n in fused.node}
    consts, floats = {t.name for t in before.initializer}, _float_tensors(before)
    for node in before.node:
        if node.op_type not in cfg.op_types and node.op_type not in HEAVY:
            continue
        q, f = qdq_nodes.get(node.name), ran.get(node.name)
        quantized = q is not None and any(i in dq_out for i in q.input)
        if q is None and f is None and node.op_type in cfg.op_types and node.name not in excluded:
            report.changed[node.name] = (f"{node.op_type}: removed by the quantizer (the quantized range "
                                         "of its input or output does the same)")
        elif quantized and f is not None and f.op_type in INTEGER_OPS:
            w = f" ({weight_bits} weights)" if node.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul") \
                and node.input[1] in consts else ""
            report.changed[node.name] = f"{node.op_type} -> {f.op_type}{w}"
        elif quantized and f is None:
            report.changed[node.name] = f"{node.op_type}: fused into the neighbouring integer op"
        elif quantized and not any(i in fused_dq for i in f.input):
            report.changed[node.name] = f"{node.op_type}: runs on the int8 tensor (no dequantize around it)"
        elif quantized:
            report.skipped[node.name] = (f"{node.op_type}: QDQ inserted, but ONNX Runtime runs it in float "
                                         "(no integer kernel for this pattern)")
        else:
            report.skipped[node.name] = _skip_reason(node, cfg, excluded, consts, floats)


def _left_out(cfg: OrtInt8StaticConfig, before: onnx.GraphProto) -> tuple[set[str], set[str]]:
    """Nodes excluded by pattern (a pattern matching nothing is an error), and with
    ``matmul_const_b_only`` the MatMuls of two activations (ONNX Runtime ignores its own
    MatMulConstBOnly option in QDQ format)."""
    names = [n.name for n in before.node]
    for pat in cfg.exclude:
        if not any(fnmatch.fnmatchcase(n, pat) for n in names):
            sample = ", ".join(n.name for n in before.node if n.op_type in cfg.op_types)
            raise UsageError(f"ort_int8_static.exclude: pattern {pat!r} matches no node of the graph.",
                             f"Node names look like: {sample[:300]}")
    excluded = {n for n in names if any(fnmatch.fnmatchcase(n, p) for p in cfg.exclude)}
    consts = {t.name for t in before.initializer}
    activations = {n.name for n in before.node if cfg.matmul_const_b_only and n.op_type == "MatMul"
                   and n.input[1] not in consts}
    return excluded, activations


@register("ort_int8_static", OrtInt8StaticConfig, accepts=(ONNX,),
          summary="static INT8 of the ONNX graph (QDQ, calibrated on the task's data; ONNX Runtime)")
def ort_int8_static(state: ModelState, cfg: OrtInt8StaticConfig, ctx: StageContext) -> StageReport:
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    if ctx.task is None:
        raise UsageError("ort_int8_static calibrates on the task's data and needs a task.",
                         "Run the stage within `slimcart compress` (or give the StageContext a task).")
    report = StageReport("ort_int8_static", cfg.model_dump())
    float_path = state.require_onnx()
    logging.getLogger("onnxruntime").setLevel(logging.ERROR)
    src = preprocess(float_path, ctx.path("preprocessed.onnx"), report) if cfg.preprocess else Path(float_path)
    before = onnx.load(str(src), load_external_data=False).graph
    excluded, activations = _left_out(cfg, before)
    scheme = resolve_scheme(cfg.activation_type, cfg.weight_type, cfg.reduce_range, report)
    qtype = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
    reader = TaskCalibrationReader(ctx.task, src, cfg.calibration, cfg.calibration_size, cfg.calibration_batch)
    out, cache = ctx.path("int8-static.onnx"), ctx.path("calibration.json")
    cache.unlink(missing_ok=True)
    try:
        method = calibrate(src, reader, cfg, scheme["activation_type"] == "int8", cache)
        quantize_static(str(src), str(out), None, quant_format=QuantFormat.QDQ, per_channel=cfg.per_channel,
                        reduce_range=scheme["reduce_range"], activation_type=qtype[scheme["activation_type"]],
                        weight_type=qtype[scheme["weight_type"]], op_types_to_quantize=list(cfg.op_types),
                        nodes_to_exclude=sorted(excluded | activations), calibrate_method=method,
                        calibration_cache_path=cache)
    except DataError:
        raise
    except Exception as exc:  # the quantizer raises bare exceptions on graphs it cannot handle
        raise ModelError(f"ONNX Runtime's static quantizer failed on {src.name}: {type(exc).__name__}: "
                         f"{str(exc)[:300]}", "Narrow op_types or exclude the failing nodes.") from None
    fused = ort_graph(out, ctx.path("int8-static.ort.onnx"))
    bits = f"int8 {'7-bit' if scheme['reduce_range'] else '8-bit'}{' per channel' if cfg.per_channel else ''}"
    describe_nodes(report, cfg, before, onnx.load(str(out), load_external_data=False).graph, fused, excluded, bits)
    if not any(op in INTEGER_OPS for op in (n.op_type for n in fused.node)):
        raise ModelError("ort_int8_static: no node runs in int8 after quantization "
                         f"(op types {cfg.op_types}; see the skipped nodes).",
                         "Check op_types against the graph's operators, and exclude fewer nodes.")
    report.stats.update({
        "calibration": {"split": cfg.calibration, "rows": reader.rows, "batches": reader.count,
                        "method": cfg.calibrate_method}
        | ({"percentile": cfg.percentile} if cfg.calibrate_method == "percentile" else {})
        | ({"bins": cfg.num_bins or (512 if cfg.calibrate_method == "entropy" else 2048)}
           if cfg.calibrate_method != "minmax" else {}),
        "ops_after": dict(collections.Counter(n.op_type for n in onnx.load(str(out)).graph.node)),
        "integer_ops_after_ort_optimization": integer_counts(fused),
        "float_ops_after_ort_optimization": {k: v for k, v in collections.Counter(
            n.op_type for n in fused.node if n.op_type in HEAVY).items()},
    })
    report.stats.update(float_parity(ctx.task, float_path, out, cfg.parity_batch))
    state.onnx_path = out
    state.quant = {"scheme": "static", "format": "QDQ", **scheme, "per_channel": cfg.per_channel,
                   "calibrate_method": cfg.calibrate_method}
    return report
