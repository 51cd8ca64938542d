"""`slimcart predict` on a compressed variant, in a fresh process with no dataset available, gives
the same predictions as the pipeline's scoring of the test split: intent (raw texts),
product_image (image files) and ctr (raw table rows, plus rows with ids never seen in training)."""
import numpy as np
import pandas as pd
import pytest
import torch

import slimcart as sc
from slimcart.data import paths
from slimcart.tasks.common import split_indices
from tests.conftest import have_fashion_mnist, run_cli

QUICK = sc.MeasureConfig(batch_sizes=[1], memory=False, deployed=False, throughput_seconds=0.0)


def _compress(task, model, recipe, spec=None):
    res = sc.compress(model, task, recipe, spec=spec, measure=QUICK, progress=False)
    return res, res.outputs[res.result.variants[0].name]


def _predict(folder, raw_path, tmp_path, n) -> pd.DataFrame:
    out = tmp_path / "pred.csv"
    empty = tmp_path / "no-data"
    empty.mkdir(exist_ok=True)
    r = run_cli("predict", str(folder), "--input", str(raw_path), "--out", str(out),
                env={"SLIMCART_DATA_DIR": str(empty)})
    assert r.returncode == 0, r.stderr
    got = pd.read_csv(out)
    assert len(got) == n
    return got


def _softmax_top(logits):
    e = np.exp(logits - logits.max(1, keepdims=True))
    p = e / e.sum(1, keepdims=True)
    return p.argmax(1), p.max(1)


def test_ctr_raw_rows_with_unseen_ids(ctr_task, tmp_path):
    model, spec = ctr_task.build_baseline()
    res, scored = _compress(ctr_task, model, "ctr/onnx-int8", spec)
    try:
        res.save(tmp_path / "out")
    finally:
        res.cleanup()
    df = pd.read_parquet(paths.find(["recsys/womens_ecommerce_reviews/womens_reviews_tabular.parquet",
                                     "recsys/womens_ecommerce_reviews/WomensClothingE-CommerceReviews.parquet.brotli"],
                                    "womens-reviews"))
    y = df["Recommended IND"].astype(str).eq("1").to_numpy().astype(int)
    _, _, test = split_indices(y, (0.1, 0.1), 0)
    raw = df.iloc[test].copy()
    raw.to_csv(tmp_path / "rows.csv", index=False)
    got = _predict(tmp_path / "out" / "variants" / "onnx-int8", tmp_path / "rows.csv", tmp_path, len(raw))
    expect = 1 / (1 + np.exp(-scored.astype(np.float64)))
    assert np.abs(got["probability"].to_numpy() - expect).max() < 1e-6
    # ids never seen in training take the fallback row: the same output as id 0 in the pipeline
    unseen = raw.head(5).assign(**{"Clothing ID": 99999999, "Class Name": "Spacesuits"})
    unseen.to_csv(tmp_path / "unseen.csv", index=False)
    got = _predict(tmp_path / "out" / "variants" / "onnx-int8", tmp_path / "unseen.csv", tmp_path, 5)
    x = tuple(t[:5].clone() for t in ctr_task.splits["test"].inputs)
    cols = ctr_task.info["categorical"]
    for c in ("Clothing ID", "Class Name"):
        x[0][:, cols.index(c)] = 0
    from slimcart.measure.runtimes import OrtRunner

    run = OrtRunner(tmp_path / "out" / "variants" / "onnx-int8" / "model.onnx", ctr_task.input_names)
    assert np.abs(got["probability"].to_numpy() - 1 / (1 + np.exp(-run(x).astype(np.float64)))).max() < 1e-6


def test_intent_raw_texts(tmp_path):
    task = sc.load_task("intent", "bitext")
    spec = {"arch": "text_classifier", "config": {"num_labels": task.info["num_classes"], "encoder": {
        "vocab_size": 30522, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
        "intermediate_size": 64, "max_position_embeddings": 128}}}
    from slimcart.models import build

    torch.manual_seed(0)
    res, scored = _compress(task, build(spec), "intent/prune30-onnx", spec)
    try:
        res.save(tmp_path / "out")
    finally:
        res.cleanup()
    df = pd.read_csv(paths.find(["intent/bitext_customer_support/bitext_intents.csv.gz"], "bitext"))
    _, _, test = split_indices(df["intent"].astype(str).to_numpy(), (0.1, 0.1), 0)
    texts = df["instruction"].iloc[test].fillna("").astype(str)
    pd.DataFrame({"instruction": texts}).to_csv(tmp_path / "texts.csv", index=False)
    got = _predict(tmp_path / "out" / "variants" / "prune30-onnx", tmp_path / "texts.csv", tmp_path, len(texts))
    best, score = _softmax_top(scored)
    assert (got["label"].to_numpy() == np.array(task.info["classes"])[best]).all()
    assert np.abs(got["score"].to_numpy() - score).max() < 1e-5


@pytest.mark.skipif(not have_fashion_mnist(), reason="Fashion-MNIST not installed")
def test_product_image_files(tmp_path):
    from PIL import Image

    from slimcart.data import images

    task = sc.load_task("product_image", "fashion-mnist")
    spec = {"arch": "resnet_small", "config": {"widths": [8, 16, 16], "blocks": [1, 1, 1], "num_classes": 10,
                                               "in_channels": 1, "image_size": 28}}
    from slimcart.models import build

    torch.manual_seed(0)
    res, scored = _compress(task, build(spec), "product_image/onnx", spec)
    try:
        res.save(tmp_path / "out")
    finally:
        res.cleanup()
    _, _, xte, _ = images.load_fashion_mnist(paths.find(["images/fashion-mnist"], "fashion-mnist"))
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(12):
        Image.fromarray(xte[i]).save(folder / f"{i:02d}.png")
    got = _predict(tmp_path / "out" / "variants" / "onnx", folder, tmp_path, 12).sort_values("input")
    best, score = _softmax_top(scored[:12])
    assert (got["label"].to_numpy() == np.array(task.info["classes"])[best]).all()
    assert np.abs(got["score"].to_numpy() - score).max() < 1e-5
