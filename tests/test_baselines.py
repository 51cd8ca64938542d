"""Baselines reach sane metrics on the real data, and the intent pipeline holds its accuracy.
These train real models (minutes on 2 cores)."""
import pytest

import slimcart as sc
from tests.conftest import have_fashion_mnist

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def bitext():
    task = sc.load_task("intent", "bitext")
    return task, task.train_baseline("demo", progress=False)


def test_bitext_intent_baseline(bitext):
    task, model = bitext
    assert task.info["num_classes"] == 27
    test = model.slimcart_training["test"]
    assert test["accuracy"] >= 0.95 and test["macro_f1"] >= 0.95


def test_bitext_compressed_variants_keep_accuracy(bitext, tmp_path):
    task, model = bitext
    res = sc.compress(model, task, ["intent/int8-dynamic", "intent/onnx-int8"], progress=False,
                      measure=sc.MeasureConfig(batch_sizes=[1, 8], memory=False))
    res.save(tmp_path / "run")
    res.cleanup()
    base = res.result.baseline
    by = {v.name: v for v in res.result.variants}
    for v in by.values():
        assert v.metrics["accuracy"] >= base.metrics["accuracy"] - 0.01, v.name
        assert v.agreement["top1_agreement"] >= 0.98, v.name
    assert by["onnx-int8"].compression_ratio > 3.0   # int8 Linear weights and embedding tables
    assert by["int8-dynamic"].compression_ratio > 1.4  # int8 Linear weights; embeddings stay float
    parity = by["onnx-int8"].stages[0]["stats"]
    assert parity["max_abs_error"] < 1e-3


def test_banking77_intent_baseline():
    task = sc.load_task("intent", "banking77")
    assert task.info["num_classes"] == 77 and len(task.splits["test"]) == 3080
    model = task.train_baseline("full", progress=False)
    assert model.slimcart_training["test"]["accuracy"] >= 0.88


needs_fashion = pytest.mark.skipif(not have_fashion_mnist(),
                                   reason="Fashion-MNIST not found (data dir or dataset-fashion-mnist)")


@pytest.fixture(scope="module")
def fashion():
    task = sc.load_task("product_image", "fashion-mnist")
    return task, task.train_baseline("full", progress=False)


@needs_fashion
def test_fashion_mnist_cnn_baseline(fashion):
    task, model = fashion
    assert len(task.splits["test"]) == 10000
    assert model.slimcart_training["test"]["accuracy"] >= 0.88


@needs_fashion
def test_fashion_mnist_channel_pruning_keeps_accuracy(fashion):
    """The shipped channel60-ft recipe: 60% of the channels removed, 3 fine-tuning epochs, within
    one point of the baseline on the 10,000 test images, measured on the reloaded artifact."""
    task, model = fashion
    res = sc.compress(model, task, "product_image/channel60-ft", progress=False,
                      measure=sc.MeasureConfig(batch_sizes=[1], runtimes=["torch"], memory=False))
    res.cleanup()
    base, v = res.result.baseline, res.result.variants[0]
    stats = v.stages[0]["stats"]
    assert stats["mac_reduction"] > 0.8 and stats["param_reduction"] > 0.8
    assert v.compression_ratio > 5.0
    assert v.metrics["accuracy"] >= base.metrics["accuracy"] - 0.01


def test_synthetic_ctr_learns_towards_the_planted_ceiling():
    """The ceiling is the AUC of the true click probabilities; a model that sees each rare id a
    few times cannot reach it, but must land clearly between chance and the ceiling."""
    task = sc.load_task("ctr", "synthetic:rows=60000,fields=6,vocab=2000,seed=1")
    ceiling = task.info["ceiling_auc"]
    assert 0.75 < ceiling < 0.9
    model = task.train_baseline("demo", progress=False)
    auc = model.slimcart_training["test"]["auc"]
    assert 0.62 < auc <= ceiling + 0.01
