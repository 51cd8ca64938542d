"""A saved model folder serves raw inputs on its own: the bundle's preprocessing gives the
tensors the task built from the same rows, and so the same outputs."""
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import slimcart as sc
from slimcart import artifact
from slimcart.accelerate.onnx_export import export_onnx
from slimcart.cli import app
from slimcart.data import images
from slimcart.data.tables import read_table
from slimcart.errors import DataError, UsageError
from slimcart.models import build
from slimcart.serving import (DataRecordWarning, check_model_data, load_bundle, saved_data_record,
                              write_bundle_files)
from slimcart.stage import ModelState
from slimcart.tasks import ctr as ctr_module
from slimcart.tasks.common import encode_labels, split_indices
from tests.conftest import have_fashion_mnist, run_cli

GROCERY = Path(__file__).resolve().parent.parent.parent / "shared/data/images/grocery-store"


def save_bundle(model, spec, task, folder, bundle=True):
    desc = {"name": task.name, "dataset": task.dataset, "classes": task.info.get("classes"),
            "num_classes": task.info.get("num_classes")}
    artifact.save(ModelState.from_module(model.eval(), spec), folder, task=desc,
                  examples=task.example_inputs(8), input_names=task.input_names)
    if bundle:
        write_bundle_files(task, folder)
    return folder


def run(model, inputs):
    with torch.inference_mode():
        return model(*inputs).float().numpy().astype(np.float64)


def softmax(x):
    e = np.exp(x - x.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def assert_same_inputs(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and torch.equal(g, w)
        assert g.is_contiguous() == w.is_contiguous()  # memory layout changes rounding


# ---- ctr -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ctr_bundle(ctr_task, tmp_path_factory):
    model, spec = ctr_task.build_baseline(0)
    return model.eval(), save_bundle(model, spec, ctr_task, tmp_path_factory.mktemp("ctr") / "m")


@pytest.fixture(scope="module")
def ctr_rows(ctr_task):
    """Raw source rows: the test split, then rows with values never seen in training."""
    raw = read_table(ctr_task.info["source"])
    y = ctr_module._binary_labels(raw["Recommended IND"], "source")
    tr, _, te = split_indices(y.astype(int), (0.1, 0.1), 0)
    new = raw.iloc[te[:5]].copy().reset_index(drop=True)
    new["Clothing ID"] = [999999, 123456, 777777, 888888, 424242]
    new["Age"] = new["Age"].astype(float)
    new.loc[0, "Class Name"] = "Spacesuits"
    new.loc[1, "Division Name"] = None
    new.loc[2, "Age"] = np.nan
    new.loc[3, "Positive Feedback Count"] = np.nan
    new.loc[4, "Department Name"] = "Moon boots"
    full = pd.concat([raw, new], ignore_index=True)
    # The task's own encoders, vocabulary and normalisation from the same training rows.
    with_bucket = full.assign(**{"Age bucket": (full["Age"] // 10).astype("Int64")})
    sparse, _ = ctr_module._encode_categorical(with_bucket, ctr_task.info["categorical"], tr)
    dense, _ = ctr_module._encode_dense(with_bucket, ctr_task.info["dense"], tr, "source")
    assert torch.equal(torch.as_tensor(sparse[te]), ctr_task.splits["test"].inputs[0])
    assert torch.equal(torch.as_tensor(dense[te]), ctr_task.splits["test"].inputs[1])
    idx = np.concatenate([te, np.arange(len(raw), len(full))])
    return full.iloc[idx], (torch.as_tensor(sparse[idx]), torch.as_tensor(dense[idx]))


def test_ctr_bundle_matches_task_on_raw_rows(ctr_bundle, ctr_rows):
    model, folder = ctr_bundle
    rows, want = ctr_rows
    bundle = load_bundle(folder)
    assert sorted(p.name for p in folder.iterdir()) == [
        "examples.safetensors", "model.safetensors", "preprocess.json", "slimcart.json", "vocab.json"]
    got = bundle.encode(rows)
    assert_same_inputs(got, want)
    assert (got[0][-5:, 0] == 0).all()  # unseen Clothing IDs -> the fallback row
    preds = bundle.predict(rows, batch_size=len(rows))
    assert list(preds.columns) == ["probability"] and preds.index.equals(rows.index)
    np.testing.assert_array_equal(preds["probability"].to_numpy(), 1 / (1 + np.exp(-run(model, want))))
    assert bundle.runtimes == ["torch", "torch_compile", "onnxruntime", "openvino"]
    ort = bundle.predict(rows, "onnxruntime", limit=50)
    np.testing.assert_allclose(ort["probability"], preds["probability"][:50], atol=1e-5)


def test_onnx_folder_serves_in_onnxruntime(ctr_task, ctr_bundle, ctr_rows, tmp_path):
    model, folder = ctr_bundle
    path = export_onnx(model, ctr_task.example_inputs(4), tmp_path / "m.onnx", ctr_task.input_names,
                       ctr_task.dynamic_axes())
    onnx_dir = tmp_path / "onnx"
    artifact.save(ModelState(format="onnx", spec=artifact.read_meta(folder)["model"], onnx_path=path),
                  onnx_dir, task={"name": "ctr"}, examples=ctr_task.example_inputs(8),
                  input_names=ctr_task.input_names)
    write_bundle_files(ctr_task, onnx_dir)
    bundle = load_bundle(onnx_dir)
    assert bundle.runtimes == ["onnxruntime", "openvino"]
    rows = ctr_rows[0].tail(30)
    np.testing.assert_allclose(bundle.predict(rows)["probability"],
                               load_bundle(folder).predict(rows)["probability"], atol=1e-5)


def test_ctr_errors(ctr_bundle, ctr_rows):
    bundle = load_bundle(ctr_bundle[1])
    rows = ctr_rows[0].head(3)
    with pytest.raises(DataError, match="Clothing ID"):
        bundle.predict(rows.drop(columns=["Clothing ID"]))
    with pytest.raises(DataError, match="negative"):
        bundle.predict(rows.assign(**{"Positive Feedback Count": -3}))
    with pytest.raises(UsageError, match="cannot run in 'tensorrt'"):
        bundle.predict(rows, "tensorrt")


def test_predict_cli_in_a_fresh_process(ctr_bundle, ctr_rows, tmp_path):
    folder = ctr_bundle[1]
    rows = pd.concat([ctr_rows[0].head(40), ctr_rows[0].tail(5)]).reset_index(drop=True)
    rows.to_csv(tmp_path / "rows.csv", index=False)
    (tmp_path / "empty").mkdir()
    res = run_cli("predict", str(folder), "--input", str(tmp_path / "rows.csv"), "--out",
                  str(tmp_path / "preds.csv"), env={"SLIMCART_DATA_DIR": str(tmp_path / "empty")})
    assert res.returncode == 0, res.stderr
    cli = pd.read_csv(tmp_path / "preds.csv")
    assert list(cli.columns) == ["row", "probability"] and len(cli) == 45
    here = load_bundle(folder).predict(rows)
    np.testing.assert_allclose(cli["probability"], here["probability"], rtol=0, atol=1e-7)
    np.testing.assert_array_equal(load_bundle(folder).predict(tmp_path / "rows.csv")["probability"],
                                  here["probability"])


def test_old_folder_and_bad_input_give_clean_errors(ctr_task, ctr_bundle, tmp_path):
    model, spec = ctr_task.build_baseline(0)
    old = save_bundle(model, spec, ctr_task, tmp_path / "old", bundle=False)
    with pytest.raises(UsageError, match="older slimcart"):
        load_bundle(old)
    runner = CliRunner()
    res = runner.invoke(app, ["predict", str(old), "--input", str(ctr_task.info["source"])])
    assert isinstance(res.exception, UsageError) and "older slimcart" in res.exception.message
    (tmp_path / "x.csv").write_text("a,b\n1,2\n")
    res = runner.invoke(app, ["predict", str(ctr_bundle[1]), "--input", str(tmp_path / "x.csv")])
    assert isinstance(res.exception, DataError) and "Clothing ID" in res.exception.message


def test_check_model_data_refuses_other_split_or_data(ctr_task, ctr_bundle):
    record = saved_data_record(ctr_bundle[1])
    assert record["split_seed"] == 0 and record["dataset"] == "womens-reviews"
    assert record["rows"] == {k: len(v) for k, v in ctr_task.splits.items()}
    check_model_data(record, ctr_task)
    with pytest.raises(UsageError, match="with split seed 0; this run uses seed 1: its test rows "
                                         "would overlap") as exc:
        check_model_data(record, sc.load_task("ctr", "womens-reviews", seed=1), model="--model M")
    assert "Use --seed 0" in exc.value.hint and exc.value.message.startswith("--model M was trained")
    with pytest.raises(UsageError, match="trained on womens-reviews .*this run uses online-shoppers"):
        check_model_data(record, sc.load_task("ctr", "online-shoppers"))
    test = ctr_task.splits["test"]
    flipped = ctr_module.Split(test.inputs, 1 - test.labels)
    other = ctr_module.CTRTask(dataset=ctr_task.dataset, splits={**ctr_task.splits, "test": flipped},
                               info=ctr_task.info)
    with pytest.raises(UsageError, match="data loaded now differs"):
        check_model_data(record, other)
    with pytest.warns(DataRecordWarning):
        check_model_data(None, ctr_task)
    with pytest.raises(UsageError, match="no record"):
        check_model_data({}, ctr_task, strict=True)


def test_synthetic_ids_are_used_as_they_are(tmp_path):
    task = sc.load_task("ctr", "synthetic:rows=2000,fields=3,vocab=50,dense=2,seed=1")
    model, spec = task.build_baseline(0)
    bundle = load_bundle(save_bundle(model, spec, task, tmp_path / "m"))
    sparse, dense = task.splits["test"].inputs
    rows = pd.DataFrame(sparse.numpy(), columns=task.info["categorical"]).assign(
        **{c: dense[:, j].numpy() for j, c in enumerate(task.info["dense"])})
    assert_same_inputs(bundle.encode(rows), (sparse, dense))
    np.testing.assert_array_equal(bundle.predict(rows)["probability"],
                                  1 / (1 + np.exp(-run(model, (sparse, dense)))))
    with pytest.raises(DataError, match="from 0 to 49"):
        bundle.encode(rows.assign(f0=50))


# ---- product_image -------------------------------------------------------------------------

def _image_folder(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for split, n in (("train", 4), ("test", 2)):
        for c in ("apple", "banana", "cherry"):
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                h, w = (int(v) for v in rng.integers(12, 40, 2))
                img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
                img.save(root / split / c / f"{i}.{'jpg' if i % 2 else 'png'}")
    return root


def _cnn(task):
    c, h, _ = task.info["input_shape"]
    torch.manual_seed(0)
    spec = {"arch": "resnet_small", "config": {"in_channels": c, "num_classes": task.info["num_classes"],
                                               "image_size": h, "widths": [4, 8, 8], "blocks": [1, 1, 1]}}
    return build(spec).eval(), spec


def _test_files(root: Path, task) -> list[Path]:
    split = root / "test"
    return [f for c in task.info["classes"] for f in sorted((split / c).iterdir())]


def test_image_bundle_matches_task_on_files_arrays_and_folders(tmp_path):
    root = _image_folder(tmp_path / "shop")
    task = sc.load_task("product_image", str(root), image_size=16)
    model, spec = _cnn(task)
    bundle = load_bundle(save_bundle(model, spec, task, tmp_path / "m"))
    want = task.splits["test"].inputs
    files = _test_files(root, task)
    assert_same_inputs(bundle.encode(files), want)
    assert_same_inputs(bundle.encode(root / "test"), want)
    _, _, xte, _, _ = images.load_image_folder(root, image_size=16)
    assert_same_inputs(bundle.encode(xte), want)
    preds = bundle.predict(root / "test")
    prob = softmax(run(model, want))
    assert preds["input"].tolist() == [str(f) for f in files]
    assert preds["label"].tolist() == [task.info["classes"][i] for i in prob.argmax(1)]
    np.testing.assert_array_equal(preds["score"], prob.max(1))
    (tmp_path / "broken.png").write_bytes(b"not an image")
    with pytest.raises(DataError, match="not a readable image"):
        bundle.predict(tmp_path / "broken.png")


@pytest.mark.skipif(not have_fashion_mnist(), reason="Fashion-MNIST not available")
def test_grey_fashion_mnist_from_png_files(tmp_path):
    task = sc.load_task("product_image", "fashion-mnist")
    model, spec = _cnn(task)
    bundle = load_bundle(save_bundle(model, spec, task, tmp_path / "m"))
    x = images.load_fashion_mnist(task.info["source"])[2][:6]
    for i, a in enumerate(x):
        Image.fromarray(a).save(tmp_path / f"{i}.png")
    want = (task.splits["test"].inputs[0][:6],)
    assert_same_inputs(bundle.encode([tmp_path / f"{i}.png" for i in range(6)]), want)
    assert_same_inputs(bundle.encode(x), want)


@pytest.mark.skipif(not GROCERY.is_dir(), reason="grocery-store photos not available")
def test_real_photos(tmp_path):
    root = tmp_path / "grocery"
    for c in ("Apple", "Banana", "Carrots"):
        photos = sorted((GROCERY / "train" / c).glob("*.jpg"))
        for split, picked in (("train", photos[:4]), ("test", photos[4:5])):
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for p in picked:
                shutil.copy(p, root / split / c / p.name)
    task = sc.load_task("product_image", str(root), image_size=32)
    model, spec = _cnn(task)
    bundle = load_bundle(save_bundle(model, spec, task, tmp_path / "m"))
    assert_same_inputs(bundle.encode(_test_files(root, task)), task.splits["test"].inputs)


# ---- intent --------------------------------------------------------------------------------

def test_intent_bundle_matches_task_on_raw_texts(tmp_path):
    task = sc.load_task("intent", "bitext")
    raw = read_table(task.info["source"])
    y, _ = encode_labels(raw["intent"].astype(str).to_numpy(), "source")
    te = split_indices(y, (0.1, 0.1), 0)[2][:24]
    texts = raw["instruction"].iloc[te].tolist()
    want = task.collate(tuple(t[:24] for t in task.splits["test"].inputs))
    torch.manual_seed(0)
    spec = {"arch": "text_classifier", "config": {"num_labels": task.info["num_classes"], "encoder": {
        "vocab_size": 30522, "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
        "intermediate_size": 32, "max_position_embeddings": 64}}}
    model = build(spec).eval()
    folder = save_bundle(model, spec, task, tmp_path / "m")
    assert "tokenizer/tokenizer.json" in json.loads((folder / "preprocess.json").read_text())["files"]
    bundle = load_bundle(folder)
    assert_same_inputs(bundle.encode(texts), want)
    assert_same_inputs(bundle.encode(raw.iloc[te]), want)
    (tmp_path / "texts.txt").write_text("\n".join(texts) + "\n")
    preds = bundle.predict(tmp_path / "texts.txt")
    prob = softmax(run(model, want))
    assert preds["input"].tolist() == texts
    assert preds["label"].tolist() == [task.info["classes"][i] for i in prob.argmax(1)]
    np.testing.assert_array_equal(preds["score"], prob.max(1))
    assert task.info["split_seed"] == 0
    again = sc.load_task("intent", "bitext", tokenizer=str(folder / "tokenizer"))
    assert again.fingerprint() == task.fingerprint()  # the saved tokenizer gives the same ids
    copy = type(task)(dataset=task.dataset, splits=task.splits, info=task.info)
    assert copy.tokenizer is None and copy.fingerprint() == task.fingerprint()
