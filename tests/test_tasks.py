"""Tasks load the shipped and the user's data into sane splits; training is deterministic."""
import numpy as np
import pandas as pd
import pytest
import torch

import slimcart as sc
from slimcart.data import paths


def test_shipped_data_is_found_without_a_data_dir(monkeypatch):
    monkeypatch.delenv("SLIMCART_DATA_DIR", raising=False)
    task = sc.load_task("ctr", "online-shoppers")
    assert sum(len(s) for s in task.splits.values()) == 12330
    assert task.info["source"].startswith(str(paths.BUNDLED))
    assert task.info["positive_rate"] == pytest.approx(1908 / 12330, abs=1e-4)


def test_womens_reviews_fields(ctr_task):
    assert ctr_task.info["categorical"] == ["Clothing ID", "Division Name", "Department Name",
                                            "Class Name", "Age bucket"]
    assert sum(len(s) for s in ctr_task.splits.values()) == 23486
    sparse = ctr_task.splits["train"].inputs[0]
    assert sparse.dtype == torch.long and sparse.shape[1] == 5
    assert (sparse.max(0).values < torch.tensor(ctr_task.info["vocab_sizes"])).all()
    # ids unseen in training map to the shared row 0
    assert int((ctr_task.splits["test"].inputs[0][:, 0] == 0).sum()) > 0


def test_user_ctr_table_and_deterministic_training(tmp_path):
    rng = np.random.default_rng(0)
    n = 20000
    df = pd.DataFrame({"user": rng.integers(0, 50, n), "item": rng.choice(["a", "b", "c", "d"], n),
                       "price": rng.gamma(2.0, 10.0, n)})
    df["clicked"] = ((df.user % 3 == 0) ^ (rng.random(n) < 0.2)).astype(int)
    path = tmp_path / "clicks.parquet"
    df.to_parquet(path)
    task = sc.load_task("ctr", str(path), categorical=["user", "item"], dense=["price"], label_column="clicked")
    assert task.input_names == ("sparse", "dense")
    assert task.info["vocab_sizes"] == [51, 5]
    a = task.train_baseline("test", progress=False)
    b = task.train_baseline("test", progress=False)
    for (k, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), k
    full = task.train_baseline("full", progress=False)
    assert full.slimcart_training["test"]["auc"] > 0.7  # user % 3 decides 80% of the labels (ceiling 0.8)


def test_user_ctr_table_without_dense_columns(tmp_path):
    df = pd.DataFrame({"u": list(range(20)) * 10, "y": [0, 1] * 100})
    path = tmp_path / "c.csv"
    df.to_csv(path, index=False)
    task = sc.load_task("ctr", str(path), categorical=["u"], label_column="y")
    assert task.input_names == ("sparse",)
    model = task.train_baseline("test", progress=False)
    assert task.predict(lambda x: model(*x).detach().numpy()).shape == (len(task.splits["test"]),)


def test_ctr_label_must_be_binary(tmp_path):
    path = tmp_path / "c.csv"
    pd.DataFrame({"u": [1, 2, 3] * 5, "y": [0, 1, 2] * 5}).to_csv(path, index=False)
    with pytest.raises(sc.DataError, match="exactly two values"):
        sc.load_task("ctr", str(path), categorical=["u"], label_column="y")


def test_user_intent_table(tmp_path):
    texts = ["where is my parcel", "cancel my order please", "i want a refund", "track package"] * 10
    labels = ["track", "cancel", "refund", "track"] * 10
    path = tmp_path / "tickets.csv"
    pd.DataFrame({"message": texts, "topic": labels}).to_csv(path, index=False)
    task = sc.load_task("intent", str(path), text_column="message", label_column="topic")
    assert task.info["classes"] == ["cancel", "refund", "track"]
    assert sum(len(s) for s in task.splits.values()) == 40
    ids, mask = task.example_inputs(4)
    assert ids.shape == mask.shape and ids.shape[1] <= 64 and int(mask[:, 0].min()) == 1


def test_image_folder_task_trains(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 24), ("test", 8)):
        for c, colour in (("red", (220, 20, 20)), ("blue", (20, 20, 220))):
            d = tmp_path / split / c
            d.mkdir(parents=True)
            for i in range(n):
                arr = (np.array(colour) + rng.integers(-20, 20, (40, 30, 3))).clip(0, 255).astype(np.uint8)
                Image.fromarray(arr).save(d / f"{i}.png")
    task = sc.load_task("product_image", str(tmp_path), image_size=16)
    assert task.info["classes"] == ["blue", "red"]
    assert task.info["input_shape"] == [3, 16, 16]
    model = task.train_baseline("full", progress=False)
    assert model.slimcart_training["test"]["accuracy"] == 1.0
