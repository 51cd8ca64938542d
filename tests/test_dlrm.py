"""DLRM beside DeepFM as the ctr baseline: its interactions by hand, training on a generated log,
saving/ONNX export, and the compression techniques that work on `embeddings` tables."""
import numpy as np
import pytest
import torch

import slimcart as sc
from slimcart.accelerate.onnx_export import export_onnx, parity
from slimcart.errors import UsageError
from slimcart.models import build
from slimcart.models.dlrm import DLRM, DLRMConfig
from slimcart.tasks.ctr_reg import frequency_l2

SPEC = "synthetic:rows=30000,fields=4,vocab=500,seed=2"


def test_pairwise_dot_products_by_hand():
    torch.manual_seed(0)
    m = DLRM(DLRMConfig(vocab_sizes=[5, 6], num_dense=3, embed_dim=4, bottom=[8], top=[7]))
    sparse, dense = torch.tensor([[1, 2], [4, 5]]), torch.randn(2, 3)
    x = m.bottom(dense)
    a, b = m.embeddings[0](sparse[:, 0]), m.embeddings[1](sparse[:, 1])
    pairs = torch.stack([(x * a).sum(1), (x * b).sum(1), (a * b).sum(1)], 1)  # (x,a), (x,b), (a,b)
    want = m.top(torch.cat([x, pairs], 1)).squeeze(1)
    torch.testing.assert_close(m(sparse, dense), want)
    assert m.top[0].in_features == 3 + 4
    with pytest.raises(ValueError, match="dense features"):
        m(sparse)
    with pytest.raises(ValueError, match="vocab_sizes"):
        DLRMConfig(vocab_sizes=[])


@pytest.fixture(scope="module")
def trained():
    task = sc.load_task("ctr", SPEC, baseline="dlrm")
    model = task.train_baseline("demo", progress=False)
    return task, model


def test_dlrm_baseline_learns_and_saves(trained, tmp_path):
    task, model = trained
    assert model.slimcart_spec["arch"] == "dlrm" and isinstance(model, DLRM)
    auc = model.slimcart_training["test"]["auc"]
    deepfm = sc.load_task("ctr", SPEC).train_baseline("demo", progress=False).slimcart_training["test"]["auc"]
    assert auc > 0.6 and auc > deepfm - 0.03, (auc, deepfm)
    back = build(model.slimcart_spec)
    back.load_state_dict(model.state_dict())
    x = task.example_inputs(64)
    torch.testing.assert_close(back.eval()(*x), model.eval()(*x))
    path = export_onnx(model, task.example_inputs(2), tmp_path / "m.onnx", task.input_names, task.dynamic_axes())
    assert parity(model, path, x, task.input_names)["max_abs_error"] < 1e-5
    term = frequency_l2(model, task.splits["train"].inputs[0], 1.0)
    assert term is not None and len(term.tables) == 4  # the row L2 sees its tables


def test_compression_of_dlrm_tables(trained):
    task, model = trained
    res = sc.compress(model, task, ["ctr/int4-rows", "ctr/rows-min2-onnx-int8"], progress=False,
                      measure=sc.MeasureConfig(batch_sizes=[1], runtimes=["torch", "onnxruntime"], memory=False,
                                               rounds=30, deployed=False, throughput_seconds=0.0))
    try:
        base = res.result.baseline
        assert {v.name for v in res.result.variants} == {"int4-rows", "rows-min2-onnx-int8"}
        for v in res.result.variants:
            assert v.metrics["auc"] > base.metrics["auc"] - 0.02, (v.name, v.metrics)
            assert v.compression_ratio > 1.2, (v.name, v.compression_ratio)  # the top MLP stays float
    finally:
        res.cleanup()


def test_unknown_ctr_baseline_is_named():
    with pytest.raises(UsageError, match="Unknown ctr baseline 'dlrn'.*dlrm"):
        sc.load_task("ctr", SPEC, baseline="dlrn")
