"""End to end on real data (women's reviews, small DeepFM): recipes -> artifacts -> result."""
import json

import pytest
import torch

import slimcart as sc
from slimcart import artifact
from slimcart.result import validate_result

RECIPES = ["ctr/int8-dynamic", "ctr/onnx-int8", "ctr/prune-threshold"]


@pytest.fixture(scope="module")
def run(ctr_task, ctr_model, tmp_path_factory):
    res = sc.compress(ctr_model, ctr_task, RECIPES, progress=False,
                      measure=sc.MeasureConfig(batch_sizes=[1, 16], memory=True))
    out = tmp_path_factory.mktemp("run") / "ctr"
    res.save(out)
    res.cleanup()
    return res.result, out


def test_baseline_learns_the_real_data(ctr_model):
    rec = ctr_model.slimcart_training
    assert rec["test"]["auc"] > 0.58  # 5 categorical fields + 1 dense; clearly above chance
    assert rec["test"]["logloss"] < 0.47  # below the constant predictor's ~0.469


def test_result_json_validates_and_holds_every_variant(run):
    result, out = run
    data = json.loads((out / "result.json").read_text())
    again = validate_result(data)
    assert [v.name for v in again.variants] == ["int8-dynamic", "onnx-int8", "prune-threshold"]
    for key in ("task", "dataset", "threads", "baseline", "variants"):
        assert key in data
    for f in ("report.md", "report.html", "pareto.png"):
        assert (out / f).stat().st_size > 500
    for v in again.variant_rows():
        assert (out / v.artifact / "slimcart.json").is_file()
        assert v.size_bytes == artifact.size_bytes(out / v.artifact)
        assert set(v.metrics) == {"auc", "logloss"}


def test_numbers_are_consistent(run):
    result, _ = run
    base = result.baseline
    assert base.compression_ratio == 1.0
    assert base.speedup_vs_baseline["torch"]["1"] == 1.0
    by = {v.name: v for v in result.variants}
    q = by["onnx-int8"]
    assert q.format == "onnx" and set(q.latency_ms) == {"onnxruntime"}
    assert any("torch: not measured" in n for n in q.notes)
    assert q.size_bytes_served == {"onnxruntime": q.size_bytes}
    assert q.compression_ratio > 2.5  # int8 embedding tables and MLP: about 4x fewer weight bytes
    assert q.speedup_vs_baseline["onnxruntime"]["16"] == pytest.approx(
        base.latency_ms["onnxruntime"]["16"].p50 / q.latency_ms["onnxruntime"]["16"].p50)
    assert q.agreement["max_abs_prob_diff"] < 0.05
    assert abs(q.metrics["auc"] - base.metrics["auc"]) < 0.01
    d = by["int8-dynamic"]
    assert d.format == "torch_int8" and any("cannot be exported" in n for n in d.notes)
    # a float PyTorch variant timed in ONNX Runtime: the ONNX it ran is saved and its size reported
    pt = by["prune-threshold"]
    assert pt.served["onnxruntime"] == "variants/prune-threshold/served/onnxruntime"
    assert pt.size_bytes_served["torch"] == pt.size_bytes != pt.size_bytes_served["onnxruntime"]
    assert pt.served_parity["onnxruntime"]["max_abs_diff"] < 1e-4
    assert d.agreement["decision_agreement"] > 0.98
    assert d.stages[0]["skipped"]["embeddings.0"].startswith("Embedding")
    p = by["prune-threshold"]
    assert p.stages[0]["stats"]["sparsity"] > 0.1
    for v in result.variant_rows():
        for rt, per in v.latency_ms.items():
            for b, pct in per.items():
                assert pct.runs == 30 * 3 and pct.calls_per_block == 3    # equal blocks for every case
                assert pct.p50_low <= pct.p50 <= pct.p50_high and pct.p50 <= pct.p95 <= pct.p99
                assert v.throughput[rt][b] > 0 and v.latency_deployed_ms[rt][b].p50 > 0
                sp = v.speedup[rt][b]
                assert sp.low <= sp.x <= sp.high and v.speedup_vs_baseline[rt][b] == sp.x
        assert v.peak_memory_mb and all(m > 50 for m in v.peak_memory_mb.values())
        assert set(v.val_metrics) == set(v.metrics) == {"auc", "logloss"}
    assert result.baseline.speedup["torch"]["1"].verdict == "no measured difference"
    assert [r["label"] for r in result.runtimes] == ["torch", "onnxruntime"]
    assert result.environment["cpu_features"] is not None and "torch_cpu_capability" in result.environment


def test_failed_run_leaves_nothing_behind(ctr_task, ctr_model, tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    bad = {"name": "bad", "stages": [{"type": "magnitude_prune", "sparsity": 0.5, "include": ["nope.*"]}]}
    with pytest.raises(sc.UsageError, match="matches no layer"):
        sc.compress(ctr_model, ctr_task, [bad], progress=False)
    assert not list(tmp_path.iterdir())


def test_existing_output_is_refused(run, ctr_task, ctr_model):
    result, out = run
    before = (out / "result.json").read_text()
    res = sc.compress(ctr_model, ctr_task, ["ctr/prune-threshold"], progress=False,
                      measure=sc.MeasureConfig(batch_sizes=[1], memory=False))
    with pytest.raises(sc.UsageError, match="already exists"):
        res.save(out)
    res.cleanup()
    assert (out / "result.json").read_text() == before
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]


def test_demo_job_on_ctr(tmp_path):
    from slimcart.demo import DEFAULT_RECIPES, combined_table, run_demo

    results = run_demo(tmp_path / "demo", progress=False, tasks=["ctr"])
    assert (tmp_path / "demo" / "ctr" / "report.html").is_file()
    rows = combined_table(results)
    names = {r["variant"] for r in rows}
    assert names == {"baseline"} | {r.split("/")[1] for r in DEFAULT_RECIPES["ctr"]}
    assert all(r["task"] == "ctr/womens-reviews" for r in rows)
    with pytest.raises(sc.UsageError, match="already exists"):
        run_demo(tmp_path / "demo", progress=False, tasks=["ctr"])


def test_identical_models_time_alike(ctr_task, ctr_model):
    """The `onnx` variant is the same graph as the baseline's served ONNX export: outputs agree
    exactly and the paired ratio is near 1. The verdict itself is not asserted: two ONNX Runtime
    sessions of one graph were measured up to 19% apart on a loaded 2-core machine (each session
    has its own thread pool), which BENCHMARKS.md reports; a test must not depend on machine load.
    The verdict rule is tested on fixed timings in test_stats.py."""
    from slimcart.accelerate.onnx_export import OnnxExportConfig

    same = sc.Recipe([OnnxExportConfig()], name="onnx")
    res = sc.compress(ctr_model, ctr_task, [same], progress=False, measure=sc.MeasureConfig(
        batch_sizes=[256], runtimes=["onnxruntime"], rounds=30, memory=False, deployed=False,
        throughput_seconds=0.0, threads=1))
    torch.set_num_threads(2)
    try:
        v = res.result.variants[0]
        sp = v.speedup["onnxruntime"]["256"]
        assert sp.low <= sp.x <= sp.high
        assert 0.6 < sp.x < 1 / 0.6, f"the same graph timed {sp.x:.2f}x apart: timing is broken"
        assert v.agreement["max_abs_prob_diff"] < 1e-6
    finally:
        res.cleanup()


def test_session_scores_validation_and_tests_only_chosen(ctr_task, ctr_model, tmp_path):
    """A search's view: candidates are scored on validation; test is scored for chosen ones only."""
    from slimcart.measure.session import Session
    from slimcart.pipeline import apply_recipe, baseline_state, measure_session
    from slimcart.recipe import resolve

    m = sc.MeasureConfig(batch_sizes=[1], memory=False, deployed=False, throughput_seconds=0.0)
    s = Session(ctr_task, m, tmp_path, progress=False)
    base, _, _ = baseline_state(ctr_model, ctr_task)
    s.add("baseline", base, baseline=True)
    for name in ("ctr/prune-threshold", "ctr/onnx-int8"):
        r = resolve(name)
        state, reports = apply_recipe(base, r, ctr_task, tmp_path / r.name, progress=False)
        s.add(r.name, state, recipe=r, stages=reports)
    assert all(set(c.outputs) == {"val"} for c in s.candidates.values())   # test not looked at
    best = max(["prune-threshold", "onnx-int8"], key=lambda n: s.val_metrics(n)["auc"])
    result = measure_session(s, [best], {})
    assert [v.name for v in result.variants] == [best]
    assert "test" not in s.candidates[{"prune-threshold", "onnx-int8"}.difference([best]).pop()].outputs
    s.close()
