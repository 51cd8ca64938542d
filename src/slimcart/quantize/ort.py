"""Dynamic INT8 quantization of an exported ONNX graph with ONNX Runtime's quantizer."""
from __future__ import annotations

import collections
import contextlib
import logging
from pathlib import Path

import onnx

from ..errors import ModelError
from ..registry import ONNX, TechniqueConfig, register
from ..stage import ModelState, StageContext, StageReport

_INTEGER = (onnx.TensorProto.INT32, onnx.TensorProto.INT64)
SUPPORTED = ("MatMul", "Gemm", "Conv", "Gather", "Attention", "LSTM", "EmbedLayerNormalization")


class OrtInt8DynamicConfig(TechniqueConfig):
    per_channel: bool = True
    reduce_range: bool = False
    weight_type: str = "int8"          # int8 | uint8
    op_types: list[str] = ["MatMul", "Gemm", "Gather"]
    preprocess: bool = True            # ONNX Runtime's shape inference + graph clean-up first

    def model_post_init(self, _ctx) -> None:
        if self.weight_type not in ("int8", "uint8"):
            raise ValueError("weight_type must be int8 or uint8")
        bad = [o for o in self.op_types if o not in SUPPORTED]
        if bad:
            raise ValueError(f"op types {bad} cannot be dynamically quantized; choose from {list(SUPPORTED)}")


@register("ort_int8_dynamic", OrtInt8DynamicConfig, accepts=(ONNX,),
          summary="dynamic INT8 of the ONNX graph (ONNX Runtime quantizer)")
def ort_int8_dynamic(state: ModelState, cfg: OrtInt8DynamicConfig, ctx: StageContext) -> StageReport:
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    report = StageReport("ort_int8_dynamic", cfg.model_dump())
    src = state.require_onnx()
    logging.getLogger("onnxruntime").setLevel(logging.ERROR)  # its shape-inference warnings are noise here
    if cfg.preprocess:
        pre = ctx.path("preprocessed.onnx").resolve()
        src = Path(src).resolve()
        # the pre-processor writes temporary models into the current directory: keep them in the work folder
        with contextlib.chdir(pre.parent):
            try:
                quant_pre_process(str(src), str(pre), skip_symbolic_shape=False)
                report.stats["preprocess"] = "symbolic shape inference + optimization"
            except Exception as exc:  # symbolic inference gives up on some graphs (e.g. BERT masks)
                quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
                report.stats["preprocess"] = f"ONNX shape inference only (symbolic failed: {exc})"
        src = pre
    out = ctx.path("int8.onnx")
    try:
        quantize_dynamic(str(src), str(out), per_channel=cfg.per_channel, reduce_range=cfg.reduce_range,
                         weight_type=QuantType.QInt8 if cfg.weight_type == "int8" else QuantType.QUInt8,
                         op_types_to_quantize=list(cfg.op_types))
    except Exception as exc:  # the quantizer raises bare exceptions on graphs it cannot handle
        raise ModelError(f"ONNX Runtime's dynamic quantizer failed on {src.name}: {exc}") from None
    src_graph = onnx.load(str(src)).graph
    before = {n.name: n.op_type for n in src_graph.node}
    integer = {t.name for t in src_graph.initializer if t.data_type in _INTEGER}
    int_tables = {n.name for n in src_graph.node if n.op_type == "Gather" and n.input[0] in integer}
    already = _quantized_nodes(src_graph)   # e.g. a Gather over a table an earlier stage packed
    after = onnx.load(str(out)).graph
    quantized = _quantized_nodes(after) - already
    for name, op in before.items():
        if op in cfg.op_types:
            if name in already:
                report.skipped[name] = f"{op}: already reads integer weights (quantized by an earlier stage)"
            elif name in quantized:
                report.changed[name] = f"{op} -> int8 weights"
            elif name in int_tables:
                report.skipped[name] = f"{op}: reads an integer table (e.g. an id map): nothing to quantize"
            else:
                report.skipped[name] = f"{op}: left in float by the quantizer (no constant weight input)"
    counts = collections.Counter(n.op_type for n in after.node)
    report.stats["ops_after"] = dict(counts)
    state.onnx_path = out
    return report


def _quantized_nodes(graph: onnx.GraphProto) -> set[str]:
    """Names of the original nodes the quantizer rewrote: into an integer op (``<name>_quant``:
    MatMulInteger, ConvInteger, ...), or to read an int8 initializer or a DequantizeLinear output
    (a Gather over a quantized table)."""
    integer_ops = ("MatMulInteger", "ConvInteger", "DynamicQuantizeMatMul", "QAttention",
                   "QEmbedLayerNormalization")
    dequantized = {o for n in graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    int8 = {t.name for t in graph.initializer if t.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)}
    out = set()
    for n in graph.node:
        if n.op_type in integer_ops and n.name.endswith("_quant"):
            out.add(n.name.removesuffix("_quant"))
        elif n.input and (n.input[0] in dequantized or n.input[0] in int8):
            out.add(n.name)
    return out
