"""End to end on real data (women's reviews, small DeepFM): recipes -> artifacts -> result."""
import json

import pytest

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
    assert q.compression_ratio > 2.5  # int8 embedding tables and MLP: about 4x fewer weight bytes
    assert q.speedup_vs_baseline["onnxruntime"]["16"] == pytest.approx(
        base.latency_ms["onnxruntime"]["16"].p50 / q.latency_ms["onnxruntime"]["16"].p50)
    assert q.agreement["max_abs_prob_diff"] < 0.05
    assert abs(q.metrics["auc"] - base.metrics["auc"]) < 0.01
    d = by["int8-dynamic"]
    assert d.format == "torch_int8" and any("cannot be exported" in n for n in d.notes)
    assert d.agreement["decision_agreement"] > 0.98
    assert d.stages[0]["skipped"]["embeddings.0"].startswith("Embedding")
    p = by["prune-threshold"]
    assert p.stages[0]["stats"]["sparsity"] > 0.1
    for v in result.variant_rows():
        for per in v.latency_ms.values():
            for pct in per.values():
                assert pct.runs >= 30 and pct.p50 <= pct.p95 <= pct.p99
        assert v.peak_memory_mb and all(m > 50 for m in v.peak_memory_mb.values())


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
