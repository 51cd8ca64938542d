"""The speed gate: a variant slower than the baseline in the runtime serving it is marked,
never chosen as best, and dropped by --gate."""
from __future__ import annotations

import time

import pytest

import slimcart as sc
from slimcart import gate
from slimcart.report import summary_table, to_markdown
from slimcart.result import validate_result


def _spd(x: float, verdict: str) -> dict:
    return {"x": x, "low": x * 0.95, "high": x * 1.05, "verdict": verdict}


def _lat(p50: float) -> dict:
    return {"p50": p50, "p95": p50, "p99": p50}


def _variant(name: str, fmt: str, acc: float, speed: dict[str, dict[str, tuple[float, str]]]) -> dict:
    return {"name": name, "artifact": f"variants/{name}", "format": fmt, "size_bytes": 1000,
            "metrics": {"accuracy": acc}, "compression_ratio": 4.0,
            "latency_ms": {rt: {b: _lat(1.0) for b in per} for rt, per in speed.items()},
            "speedup_vs_baseline": {rt: {b: x for b, (x, _) in per.items()} for rt, per in speed.items()},
            "speedup": {rt: {b: _spd(x, vd) for b, (x, vd) in per.items()} for rt, per in speed.items()}}


def _result() -> "sc.Result":
    base = {"name": "baseline", "artifact": "baseline", "format": "torch", "size_bytes": 4000,
            "metrics": {"accuracy": 0.90}, "compression_ratio": 1.0, "speedup_vs_baseline": {},
            "latency_ms": {"torch": {"1": _lat(1.0), "64": _lat(1.0)}, "onnxruntime": {"1": _lat(1.0), "64": _lat(1.0)}}}
    variants = [
        # ONNX int8, faster at b=64 but slower at b=1 in ONNX Runtime (the runtime that serves it)
        _variant("convinteger", "onnx", 0.905, {"onnxruntime": {"1": (0.4, "slower"), "64": (1.3, "faster")}}),
        # a PyTorch variant: faster in eager torch; slower in ONNX Runtime (not its serving runtime)
        _variant("pruned", "torch", 0.899, {"torch": {"1": (1.5, "faster"), "64": (1.4, "faster")},
                                             "onnxruntime": {"1": (0.8, "slower"), "64": (1.0, "no measured difference")}}),
        _variant("static", "onnx", 0.897, {"onnxruntime": {"1": (2.9, "faster"), "64": (2.5, "faster")}}),
        _variant("tiny-but-bad", "onnx", 0.80, {"onnxruntime": {"1": (9.0, "faster"), "64": (9.0, "faster")}}),
        _variant("same", "torch", 0.90, {"torch": {"1": (1.01, "no measured difference"), "64": (1.2, "faster")}}),
    ]
    data = {"task": "product_image", "dataset": "x", "threads": 2, "primary_metric": "accuracy",
            "baseline": base, "variants": variants,
            "runtimes": [{"runtime": "torch", "label": "torch"}, {"runtime": "onnxruntime", "label": "onnxruntime"}]}
    return validate_result(data)


def test_assess_judges_in_the_serving_runtime_at_every_batch_size():
    r = _result()
    by = {v.name: gate.gate_of(r, v) for v in r.variants}
    assert by["convinteger"]["verdict"] == "slower" and by["convinteger"]["runtime"] == "onnxruntime"
    assert "b=1" in by["convinteger"]["reason"] and "b=64" not in by["convinteger"]["reason"]
    assert by["pruned"]["verdict"] == "faster" and by["pruned"]["runtime"] == "torch"
    assert by["pruned"]["slower_in"] == {"onnxruntime": ["1"]}   # listed, but not its serving runtime
    assert by["static"]["verdict"] == "faster"
    assert by["same"]["verdict"] == "no measured difference"


def test_best_is_never_a_slower_variant_nor_one_that_loses_accuracy():
    r = _result()
    assert gate.best_variant(r).name == "static"          # 'tiny-but-bad' loses 10 points
    assert gate.best_variant(r, max_drop=0.2).name == "tiny-but-bad"
    only_slow = r.model_copy(update={"variants": [r.variants[0]]})
    assert gate.best_variant(only_slow) is None          # the slow one has the best accuracy


def test_report_marks_slower_variants():
    r = _result()
    rows = {row["Variant"]: row for row in summary_table(r)}
    assert rows["convinteger"]["Speed gate"] == "SLOWER (onnxruntime b=1)"
    assert rows["static"]["Speed gate"] == "faster" and rows["same"]["Speed gate"] == "="
    md = to_markdown(r)
    assert "Best: static" in md and "convinteger: SLOWER" in md
    assert "pruned: faster in torch, but slower in onnxruntime b=1" in md


@pytest.mark.parametrize("drop", [False, True])
def test_a_deliberately_slow_variant_is_marked_and_dropped(ctr_task, ctr_model, tmp_path, drop):
    """Real timing: one variant's runner sleeps 20 ms per call (robust on a busy machine)."""
    from slimcart.measure.session import Session
    from slimcart.pipeline import CompressResult, apply_recipe, baseline_state, measure_session
    from slimcart.recipe import resolve

    m = sc.MeasureConfig(batch_sizes=[1, 8], rounds=30, memory=False, deployed=False, throughput_seconds=0.0,
                         runtimes=["torch"])
    s = Session(ctr_task, m, tmp_path / "work", progress=False)
    base, _, _ = baseline_state(ctr_model, ctr_task)
    s.add("baseline", base, baseline=True)
    r = resolve("ctr/prune-threshold")
    for name in ("fine", "slow"):
        state, reports = apply_recipe(base, r, ctr_task, tmp_path / name, progress=False)
        s.add(name, state, recipe=r, stages=reports)
    fast = s.candidates["slow"].runners["torch"]

    def slow(*x):
        time.sleep(0.02)
        return fast(*x)

    s.candidates["slow"].runners["torch"] = slow
    result = measure_session(s, ["fine", "slow"], {})
    s.close()
    by = {v.name: v for v in result.variants}
    assert by["slow"].gate["verdict"] == "slower" and by["slow"].gate["runtime"] == "torch"
    assert set(by["slow"].gate["slower_in"]["torch"]) <= {"1", "8"}
    # "fine" does the baseline's work: its verdict is noise on a busy machine, so it is not asserted
    assert any("speed gate" in n for n in by["slow"].notes)
    res = CompressResult(result, tmp_path / "work")
    if drop:
        dropped = res.drop_slower()
        assert "slow" in dropped and "slow" not in [v.name for v in res.result.variants]
        gated = {g["name"]: g["reason"] for g in res.result.gated}
        assert "slower" in gated["slow"] and set(gated) == set(dropped)
        assert not (tmp_path / "work" / "artifacts" / "variants" / "slow").exists()
        out = res.save(tmp_path / "out")
        assert "dropped by --gate" in (out / "report.md").read_text()
    assert gate.best_variant(res.result) is None or gate.best_variant(res.result).name != "slow"
