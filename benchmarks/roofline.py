"""Measured roofline of the intent model's int8 schemes on this CPU, in ONNX Runtime.

Two measurements, both in the process that times the variants:
- the int8 GEMM rate of ONNX Runtime's kernels on the model's largest matmul shape: dynamic
  activation quantization + MatMulInteger (what `ort_int8_dynamic` runs), MatMulInteger on
  already-quantized uint8 activations, and QLinearMatMul (what static QDQ runs); the fastest is
  the ceiling of any int8 matmul here;
- an operator profile of each ONNX graph (ONNX Runtime's profiler): the time in matmuls (their
  FLOPs from the profiled shapes), in activation (de)quantization, and in everything else
  (softmax, masking, layer norms, GELU, bias and residual adds, transposes).

An int8 scheme changes the matmuls and the (de)quantization around them; the other operators run
in float32 whatever the scheme (ONNX Runtime's CPU provider has no int8 softmax, LayerNorm or
GELU). So no int8 scheme can take less than ``floor + matmul FLOPs / int8 peak``, where ``floor`` is
the non-matmul time of the fastest graph measured (for a fused attention operator, its time less
its FLOPs at the int8 peak)."""
from __future__ import annotations

import collections
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

MATMUL_OPS = {"MatMul", "FusedMatMul", "Gemm", "MatMulInteger", "MatMulIntegerToFloat", "DynamicQuantizeMatMul",
              "QLinearMatMul", "MatMulNBits", "QGemm"}
ATTENTION_OPS = {"Attention", "QAttention"}          # input projection + attention in one operator
QUANT_OPS = {"DynamicQuantizeLinear", "QuantizeLinear", "DequantizeLinear"}


def _session(model: onnx.ModelProto | str, threads: int, profile_dir: str | None = None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if profile_dir is not None:
        so.enable_profiling = True
        so.profile_file_prefix = str(Path(profile_dir) / "ort")
    data = model if isinstance(model, str) else model.SerializeToString()
    return ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])


def _const(name: str, value, dtype) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value, dtype=dtype), name)


def _matmul(k: int, n: int, kind: str) -> onnx.ModelProto:
    """x[m, k] @ W[k, n] in one of the kernels: fp32 MatMul; ``dynamic``: DynamicQuantizeLinear ->
    MatMulInteger -> rescale (ONNX Runtime fuses it to DynamicQuantizeMatMul); ``integer``:
    MatMulInteger on uint8 input; ``qlinear``: QLinearMatMul on uint8 input, uint8 output."""
    rng = np.random.default_rng(0)
    w8 = numpy_helper.from_array(rng.integers(-127, 128, (k, n)).astype(np.int8), "w")
    out_f = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["m", n])
    in_f = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", k])
    in_u8 = helper.make_tensor_value_info("x", TensorProto.UINT8, ["m", k])
    if kind == "fp32":
        w = numpy_helper.from_array(rng.standard_normal((k, n)).astype(np.float32), "w")
        g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "mm", [in_f], [out_f], [w])
    elif kind == "dynamic":
        nodes = [helper.make_node("DynamicQuantizeLinear", ["x"], ["xq", "xs", "xz"]),
                 helper.make_node("MatMulInteger", ["xq", "w", "xz", "wz"], ["acc"]),
                 helper.make_node("Cast", ["acc"], ["accf"], to=TensorProto.FLOAT),
                 helper.make_node("Mul", ["xs", "ws"], ["s"]),
                 helper.make_node("Mul", ["accf", "s"], ["y"])]
        g = helper.make_graph(nodes, "mm", [in_f], [out_f],
                              [w8, _const("ws", np.full((n,), 0.01), np.float32), _const("wz", np.zeros(n), np.int8)])
    elif kind == "integer":
        out = helper.make_tensor_value_info("y", TensorProto.INT32, ["m", n])
        g = helper.make_graph([helper.make_node("MatMulInteger", ["x", "w", "xz", "wz"], ["y"])], "mm", [in_u8], [out],
                              [w8, _const("xz", 128, np.uint8), _const("wz", np.zeros(n), np.int8)])
    elif kind == "static":            # float in, float out: QuantizeLinear -> QLinearMatMul -> DequantizeLinear
        nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
                 helper.make_node("QLinearMatMul", ["xq", "xs", "xz", "w", "ws", "wz", "ys", "yz"], ["yq"]),
                 helper.make_node("DequantizeLinear", ["yq", "ys", "yz"], ["y"])]
        inits = [w8, _const("xs", 0.02, np.float32), _const("xz", 128, np.uint8), _const("ws", 0.01, np.float32),
                 _const("wz", 0, np.int8), _const("ys", 0.5, np.float32), _const("yz", 128, np.uint8)]
        g = helper.make_graph(nodes, "mm", [in_f], [out_f], inits)
    elif kind == "qlinear":
        out = helper.make_tensor_value_info("y", TensorProto.UINT8, ["m", n])
        inits = [w8, _const("xs", 0.02, np.float32), _const("xz", 128, np.uint8), _const("ws", 0.01, np.float32),
                 _const("wz", 0, np.int8), _const("ys", 0.5, np.float32), _const("yz", 128, np.uint8)]
        g = helper.make_graph([helper.make_node("QLinearMatMul", ["x", "xs", "xz", "w", "ws", "wz", "ys", "yz"], ["y"])],
                              "mm", [in_u8], [out], inits)
    else:
        raise ValueError(kind)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


KERNELS = {"fp32": "fp32 MatMul", "dynamic": "int8, float in/out: DynamicQuantizeLinear + MatMulInteger",
           "static": "int8, float in/out: QuantizeLinear + QLinearMatMul + DequantizeLinear",
           "qlinear": "int8, uint8 in/out: QLinearMatMul", "integer": "int8, uint8 in, int32 out: MatMulInteger"}
FLOAT_IN = ("fp32", "dynamic", "static")


def gemm_rates(m: int, k: int = 384, n: int = 1536, threads: int = 2, repeats: int = 40) -> dict[str, float]:
    """GFLOP/s (fp32) or GOP/s (int8) of an (m x k)·(k x n) matmul in each kernel of ``KERNELS``,
    median of ``repeats`` calls after warm-up, the kernels interleaved."""
    rng = np.random.default_rng(1)
    xf = rng.standard_normal((m, k)).astype(np.float32)
    xu = rng.integers(0, 256, (m, k)).astype(np.uint8)
    sessions = {kind: _session(_matmul(k, n, kind), threads) for kind in KERNELS}
    feeds = {kind: {"x": xf if kind in FLOAT_IN else xu} for kind in KERNELS}
    times = collections.defaultdict(list)
    for kind, s in sessions.items():
        for _ in range(5):
            s.run(None, feeds[kind])
    for _ in range(repeats):
        for kind, s in sessions.items():
            t0 = time.perf_counter()
            s.run(None, feeds[kind])
            times[kind].append(time.perf_counter() - t0)
    return {kind: 2 * m * k * n / float(np.median(t)) / 1e9 for kind, t in times.items()}


def _node_flops(op: str, inputs: list[list[int]], outputs: list[list[int]]) -> float:
    if op in ATTENTION_OPS:               # (B, L, H): QKV projection 2·B·L·H·3H, then QK^T and AV 2·2·B·L²·H
        b, length, h = outputs[0]
        return 2 * b * length * h * 3 * h + 4 * b * length * length * h
    if op in MATMUL_OPS and inputs and outputs:
        return 2 * float(np.prod(outputs[0])) * inputs[0][-1]
    return 0.0


def _shapes(entries: list[dict]) -> list[list[int]]:
    return [next(iter(e.values())) for e in entries if e]


def op_profile(onnx_path: str | Path, feeds: dict[str, np.ndarray], threads: int = 2, runs: int = 10) -> dict:
    """Per run of ``onnx_path`` on ``feeds``: ms in each operator type, and the matmul FLOPs."""
    with tempfile.TemporaryDirectory() as tmp:
        sess = _session(str(onnx_path), threads, tmp)
        for _ in range(3):
            sess.run(None, feeds)
        t0 = time.perf_counter()
        for _ in range(runs):
            sess.run(None, feeds)
        wall = (time.perf_counter() - t0) / runs
        events = json.loads(Path(sess.end_profiling()).read_text())
    nodes = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    per_run = len(nodes) // (runs + 3)
    nodes = nodes[-per_run * runs:]       # the timed runs only
    ms, flops = collections.Counter(), collections.Counter()
    attention = []
    for e in nodes:
        op = e["args"]["op_name"]
        ms[op] += e["dur"] / 1e3 / runs
        f = _node_flops(op, _shapes(e["args"].get("input_type_shape", [])),
                        _shapes(e["args"].get("output_type_shape", [])))
        flops[op] += f / runs
        if op in ATTENTION_OPS:
            attention.append((e["dur"] / 1e3 / runs, f / runs))
    return {"ms": dict(ms), "gflop": {k: v / 1e9 for k, v in flops.items() if v}, "attention": attention,
            "wall_ms": wall * 1e3}


def split(profile: dict, peak_gops: float) -> dict[str, float]:
    """The profile's time in matmuls, in (de)quantization and in the rest; ``floor``: the time no
    int8 scheme removes (the rest, plus what a fused attention takes beyond its FLOPs at the peak)."""
    ms = profile["ms"]
    matmul = sum(v for k, v in ms.items() if k in MATMUL_OPS | ATTENTION_OPS)
    quant = sum(v for k, v in ms.items() if k in QUANT_OPS)
    total = sum(ms.values())
    other = total - matmul - quant
    attn_rest = sum(max(0.0, t - f / (peak_gops * 1e9) * 1e3) for t, f in profile["attention"])
    gflop = sum(profile["gflop"].values())
    return {"total": total, "matmul": matmul, "quant": quant, "other": other, "floor": other + attn_rest,
            "gflop": gflop, "matmul_gops": gflop / max(matmul, 1e-9) * 1e3}


def achieved(gflop: float, p50_ms: float) -> float:
    return gflop / (p50_ms / 1e3)
