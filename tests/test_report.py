"""Result schema and report writers (fast: no models are run)."""
from __future__ import annotations

import json
import re

import pydantic
import pytest

from slimcart.report import summary_table, write_report
from slimcart.result import load_result, save_result, validate_result


def _lat(p50: float) -> dict:
    return {"p50": p50, "p95": p50 * 1.2, "p99": p50 * 1.5, "mean": p50 * 1.05, "runs": 200}


BASE_P50 = {"1": 4.0, "32": 40.0}


def _speedups(runtime_p50: dict[str, float]) -> dict[str, float]:
    return {b: BASE_P50[b] / p for b, p in runtime_p50.items()}


def make_data() -> dict:
    base_size = 40_000_000
    int8_p50 = {"1": 2.5, "32": 21.6}
    onnx_p50 = {"1": 1.6, "32": 12.5}
    return {
        "task": "intent", "dataset": "shop-intents", "threads": 4, "primary_metric": "accuracy",
        "created": "2025-01-01T00:00:00Z",
        "environment": {"torch": "2.13.0", "onnxruntime": "1.32.0", "cpu": "x86_64, 16 cores"},
        "baseline": {
            "name": "baseline", "recipe": None, "artifact": "baseline", "format": "torch",
            "size_bytes": base_size, "metrics": {"accuracy": 0.9123, "macro_f1": 0.9011},
            "latency_ms": {"torch": {b: _lat(p) for b, p in BASE_P50.items()}},
            "throughput": {"torch": {"1": 250.0, "32": 800.0}},
            "speedup_vs_baseline": {"torch": {"1": 1.0, "32": 1.0}},
            "compression_ratio": 1.0, "peak_memory_mb": {"torch": 512.3},
        },
        "variants": [
            {
                "name": "torch-int8", "recipe": "intent/dynamic-int8.yaml",
                "artifact": "variants/torch-int8", "format": "torch_int8",
                "size_bytes": 11_000_000, "metrics": {"accuracy": 0.9071, "macro_f1": 0.8950},
                "latency_ms": {"torch": {b: _lat(p) for b, p in int8_p50.items()}},
                "throughput": {"torch": {"1": 400.0, "32": 1481.5}},
                "speedup_vs_baseline": {"torch": _speedups(int8_p50)},
                "compression_ratio": base_size / 11_000_000,
                "agreement": {"top1": 0.987},
                "stages": [{
                    "technique": "dynamic_int8", "config": {"dtype": "qint8"},
                    "changed": {"encoder.layer.0.fc": "Linear -> dynamic int8 Linear"},
                    "skipped": {"embeddings": "embedding layers are kept in float",
                                "classifier": "output layer excluded by config"},
                    "stats": {"quantized_layers": 1}, "seconds": 0.42,
                }],
                "notes": ["onnxruntime: not measured: dynamic-quantized torch modules cannot "
                          "be exported"],
            },
            {
                "name": "onnx-int8", "recipe": "intent/onnx-int8.yaml",
                "artifact": "variants/onnx-int8", "format": "onnx", "size_bytes": 10_500_000,
                "metrics": {"accuracy": 0.9105, "macro_f1": 0.8999},
                "latency_ms": {"onnxruntime": {b: _lat(p) for b, p in onnx_p50.items()}},
                "speedup_vs_baseline": {},
                "compression_ratio": base_size / 10_500_000,
                "agreement": {"top1": 0.995},
                "peak_memory_mb": {"onnxruntime": 210.0},
                "stages": [
                    {"technique": "onnx_export", "config": {"opset": 17}, "changed": {},
                     "skipped": {}, "stats": {"max_abs_diff": 2e-6}, "seconds": 1.5},
                    {"technique": "ort_int8", "config": {"per_channel": True},
                     "changed": {f"MatMul_{i}": "int8" for i in range(30)},
                     "skipped": {"MatMul_out": "sensitive: accuracy drop above 0.5 points"},
                     "stats": {}, "seconds": 3.0},
                ],
            },
        ],
    }


@pytest.fixture
def result():
    return validate_result(make_data())


def test_write_report(result, tmp_path):
    paths = write_report(result, tmp_path)
    for name in ("report.md", "report.html", "pareto.png"):
        assert (tmp_path / name).is_file() and (tmp_path / name).stat().st_size > 0
    assert set(paths.values()) == {tmp_path / n for n in ("report.md", "report.html",
                                                          "pareto.png")}
    png = (tmp_path / "pareto.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert 5_000 < len(png) < 2_000_000

    html = (tmp_path / "report.html").read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?https?://""", html, re.I)
    assert "http://" not in html and "https://" not in html
    assert "data:image/png;base64," in html
    md = (tmp_path / "report.md").read_text()
    for v in result.variant_rows():
        assert v.name in html and v.name in md
    for reason in ("embedding layers are kept in float", "output layer excluded by config",
                   "sensitive: accuracy drop above 0.5 points"):
        assert reason in md
    assert "MatMul_29: int8" in md  # every changed layer is listed
    assert f"{4.0 / 2.5:.2f}x" in md and f"{40.0 / 21.6:.2f}x" in md  # 1.60x, 1.85x
    assert "-0.52" in md  # accuracy delta in points
    assert "cannot be exported" in md


def test_summary_table(result):
    rows = summary_table(result)
    assert [r["Variant"] for r in rows] == ["baseline", "torch-int8", "onnx-int8"]
    assert len({tuple(r) for r in rows}) == 1  # same columns in every row
    assert rows[1]["Size (MB)"] == "11.00" and rows[1]["Compression"] == "3.64x"
    assert rows[1]["p50 ms torch b=32"] == "21.60 (1.85x)"
    assert rows[2]["p50 ms torch b=32"] == "—"


def test_plot_with_only_baseline(result, tmp_path):
    alone = result.model_copy(update={"variants": []})
    write_report(alone, tmp_path)
    assert (tmp_path / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    empty = alone.model_copy(update={"baseline": alone.baseline.model_copy(
        update={"latency_ms": {}})})
    write_report(empty, tmp_path / "empty")
    assert (tmp_path / "empty" / "pareto.png").stat().st_size > 0


def test_validation_rejects_bad_results():
    data = make_data()
    del data["baseline"]
    with pytest.raises(pydantic.ValidationError):
        validate_result(data)
    data = make_data()
    data["variants"][0]["size_bytes"] = -1
    with pytest.raises(pydantic.ValidationError):
        validate_result(data)


def test_round_trip(result, tmp_path):
    again = validate_result(json.loads(json.dumps(result.model_dump(mode="json"))))
    assert again == result
    assert again.model_dump(mode="json") == result.model_dump(mode="json")
    assert load_result(save_result(result, tmp_path / "result.json")) == result
