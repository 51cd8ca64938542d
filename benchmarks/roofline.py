"""Measured GEMM rates of this CPU in ONNX Runtime, fp32 and int8, on one matmul shape: the ceiling
against which a model's achieved rate says how much faster any scheme of that precision can be."""
from __future__ import annotations

import time

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def _session(model: onnx.ModelProto, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _matmul(k: int, n: int, int8: bool) -> onnx.ModelProto:
    """x[m, k] @ W[k, n]; int8: ONNX Runtime's dynamic path (DynamicQuantizeLinear -> MatMulInteger
    with int8 weights, what `ort_int8_dynamic` produces, fused to DynamicQuantizeMatMul)."""
    rng = np.random.default_rng(0)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", k])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["m", n])
    if not int8:
        w = numpy_helper.from_array(rng.standard_normal((k, n)).astype(np.float32), "w")
        nodes = [helper.make_node("MatMul", ["x", "w"], ["y"])]
        inits = [w]
    else:
        w = numpy_helper.from_array(rng.integers(-127, 128, (k, n)).astype(np.int8), "w")
        ws = numpy_helper.from_array(np.full((n,), 0.01, np.float32), "ws")
        wz = numpy_helper.from_array(np.zeros((n,), np.int8), "wz")
        nodes = [helper.make_node("DynamicQuantizeLinear", ["x"], ["xq", "xs", "xz"]),
                 helper.make_node("MatMulInteger", ["xq", "w", "xz", "wz"], ["acc"]),
                 helper.make_node("Cast", ["acc"], ["accf"], to=TensorProto.FLOAT),
                 helper.make_node("Mul", ["xs", "ws"], ["s"]),
                 helper.make_node("Mul", ["accf", "s"], ["y"])]
        inits = [w, ws, wz]
    g = helper.make_graph(nodes, "mm", [x], [y], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def gemm_rates(m: int, k: int = 384, n: int = 1536, threads: int = 2, repeats: int = 40) -> dict[str, float]:
    """GFLOP/s (fp32) and GOP/s (int8) of an (m x k)·(k x n) matmul in ONNX Runtime, median of
    ``repeats`` calls after warm-up."""
    x = np.random.default_rng(1).standard_normal((m, k)).astype(np.float32)
    out = {}
    for name, int8 in (("fp32", False), ("int8", True)):
        sess = _session(_matmul(k, n, int8), threads)
        for _ in range(5):
            sess.run(None, {"x": x})
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            sess.run(None, {"x": x})
            times.append(time.perf_counter() - t0)
        out[name] = 2 * m * k * n / float(np.median(times)) / 1e9
    return out


def achieved(gflop: float, p50_ms: float) -> float:
    return gflop / (p50_ms / 1e3)
