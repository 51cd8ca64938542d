"""The measured roofline behind the intent int8 benchmark (benchmarks/roofline.py): FLOPs read off
the profiled shapes, the split of a profile into matmul / (de)quantize / other time, and the floor."""
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import roofline  # noqa: E402


def test_flops_of_matmuls_and_fused_attention():
    assert roofline._node_flops("MatMul", [[2, 5, 384], [384, 1536]], [[2, 5, 1536]]) == 2 * 10 * 384 * 1536
    assert roofline._node_flops("DynamicQuantizeMatMul", [[7, 64], [64, 32]], [[7, 32]]) == 2 * 7 * 64 * 32
    b, length, h = 3, 11, 64   # QKV projection, then QK^T and AV
    assert roofline._node_flops("QAttention", [[b, length, h]], [[b, length, h]]) == \
        2 * b * length * h * 3 * h + 4 * b * length * length * h
    assert roofline._node_flops("Softmax", [[3, 4]], [[3, 4]]) == 0


def test_split_and_floor():
    profile = {"ms": {"MatMul": 10.0, "DynamicQuantizeLinear": 2.0, "Softmax": 5.0, "QAttention": 8.0},
               "gflop": {"MatMul": 4.0, "QAttention": 2.0}, "attention": [(8.0, 2e9)]}
    s = roofline.split(profile, peak_gops=1000.0)      # 2 GFLOP at 1000 GOP/s: 2 ms of the 8
    assert s["total"] == 25.0 and s["matmul"] == 18.0 and s["quant"] == 2.0 and s["other"] == 5.0
    assert s["floor"] == pytest.approx(5.0 + 6.0)
    assert s["gflop"] == 6.0 and s["matmul_gops"] == pytest.approx(6.0 / 18.0 * 1e3)


def test_profile_of_one_matmul_counts_its_flops(tmp_path):
    import onnx

    path = tmp_path / "mm.onnx"
    onnx.save(roofline._matmul(64, 32, "dynamic"), str(path))
    prof = roofline.op_profile(path, {"x": np.ones((16, 64), np.float32)}, threads=1, runs=3)
    assert sum(prof["gflop"].values()) == pytest.approx(2 * 16 * 64 * 32 / 1e9)
    assert sum(prof["ms"].values()) > 0 and prof["wall_ms"] > 0


def test_kernel_rates_are_positive():
    rates = roofline.gemm_rates(32, 64, 64, threads=1, repeats=3)
    assert set(rates) == set(roofline.KERNELS) and all(v > 0 for v in rates.values())
