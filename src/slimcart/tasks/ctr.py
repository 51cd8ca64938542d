"""Click / conversion prediction with one embedding table per categorical field (DeepFM)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import log_loss, roc_auc_score

from ..data import paths
from ..data.tables import is_table, read_table, require_columns
from ..errors import DataError, UsageError, closest
from ..models.deepfm import DeepFM, DeepFMConfig
from .base import Split, Task, TrainConfig
from .common import split_indices

DATASETS = {
    "womens-reviews": "women's clothing reviews, label Recommended IND (CC0)",
    "online-shoppers": "online shoppers' sessions, label Revenue (CC-BY-4.0)",
    "synthetic": "generated click log with a planted ground truth; synthetic:rows=..,fields=..,vocab=..",
}
_SHOPPERS_CAT = ["Month", "OperatingSystems", "Browser", "Region", "TrafficType",
                 "returning_ visitor", "weekend"]
_SHOPPERS_DENSE = ["Administrative", "Administrative_Duration", "Informational",
                   "Informational_Duration", "ProductRelated", "ProductRelated_Duration",
                   "BounceRates", "ExitRates", "PageValues", "SpecialDay"]


def _table_dataset(dataset: str, data_dir, categorical, dense, label_column):
    if dataset == "womens-reviews":
        p = paths.find(["recsys/womens_ecommerce_reviews/WomensClothingE-CommerceReviews.parquet.brotli",
                        "recsys/womens_ecommerce_reviews/womens_reviews_tabular.parquet"],
                       "womens-reviews", data_dir)
        df = read_table(p)
        require_columns(df, {"columns": ["Age", "Clothing ID", "Recommended IND"]}, str(p))
        df = df.assign(**{"Age bucket": (df["Age"] // 10).astype("Int64")})
        return df, ["Clothing ID", "Division Name", "Department Name", "Class Name", "Age bucket"], \
            ["Positive Feedback Count"], "Recommended IND", str(p)
    if dataset == "online-shoppers":
        p = paths.find(["recsys/online_shoppers/online_shoppers_intention_preprocessed_danlove99.csv",
                        "recsys/online_shoppers/online_shoppers.csv.gz"], "online-shoppers", data_dir)
        return read_table(p), _SHOPPERS_CAT, _SHOPPERS_DENSE, "Revenue", str(p)
    path = Path(dataset)
    if not path.exists() or not is_table(path):
        raise UsageError(f"Unknown ctr dataset {dataset!r}.{closest(dataset, list(DATASETS))}",
                         f"Use one of {', '.join(DATASETS)} or a CSV/parquet file with "
                         "--categorical, --dense and --label-column.")
    df = read_table(path)
    if not categorical:
        raise UsageError(f"{path}: name the categorical columns with --categorical a,b,c.")
    require_columns(df, {"--categorical": categorical, "--dense": dense or [],
                         "--label-column": label_column}, str(path))
    return df, list(categorical), list(dense or []), label_column, str(path)


def _binary_labels(values: pd.Series, source: str) -> np.ndarray:
    if values.isna().any():
        raise DataError(f"{source}: the label column {values.name!r} has empty values.")
    uniq = sorted(values.astype(str).unique())
    if len(uniq) != 2:
        raise DataError(f"{source}: the label column {values.name!r} must have exactly two values "
                        f"(click / no click); it has {len(uniq)}: {uniq[:5]}")
    positive = "1" if "1" in uniq else ("True" if "True" in uniq else uniq[1])
    return (values.astype(str) == positive).to_numpy(np.float32)


@dataclass
class CTRTask(Task):
    name = "ctr"
    metric_names = ("auc", "logloss")
    primary_metric = "auc"

    @property
    def input_names(self) -> tuple[str, ...]:  # type: ignore[override]
        return ("sparse", "dense") if self.info["dense"] else ("sparse",)

    @classmethod
    def load(cls, dataset: str = "womens-reviews", data_dir=None, categorical=None, dense=None,
             label_column: str | None = None, seed: int = 0, **_: Any) -> "CTRTask":
        if dataset.split(":")[0] == "synthetic":
            return cls._synthetic(dataset, seed)
        df, cat_cols, dense_cols, label, source = _table_dataset(dataset, data_dir, categorical,
                                                                 dense, label_column)
        y = _binary_labels(df[label], source)
        tr, va, te = split_indices(y.astype(int), (0.1, 0.1), seed)
        sparse, vocabs = _encode_categorical(df, cat_cols, tr)
        dense_arr, norm = _encode_dense(df, dense_cols, tr, source)
        info = {"categorical": cat_cols, "dense": dense_cols, "label_column": label,
                "vocab_sizes": [len(v) + 1 for v in vocabs], "source": source,
                "positive_rate": float(y.mean()), "dense_norm": norm}
        return cls._from_arrays(dataset if dataset in DATASETS else source, sparse, dense_arr, y,
                                (tr, va, te), info)

    @classmethod
    def _synthetic(cls, dataset: str, seed: int) -> "CTRTask":
        from ..data import synthetic

        spec = synthetic.parse_spec(dataset)
        log = synthetic.generate(spec)
        n = len(log.labels)
        tr, va, te = np.split(np.random.default_rng(seed).permutation(n), [int(0.8 * n), int(0.9 * n)])
        info = {"categorical": [f"f{i}" for i in range(spec.fields)],
                "dense": [f"d{i}" for i in range(spec.dense)], "label_column": "click",
                "vocab_sizes": [spec.vocab] * spec.fields, "source": "generated",
                "positive_rate": float(log.labels.mean()), "synthetic": spec.__dict__,
                "ceiling_auc": float(log.ceiling_auc())}
        return cls._from_arrays(dataset, log.sparse, log.dense, log.labels, (tr, va, te), info)

    @classmethod
    def _from_arrays(cls, dataset, sparse, dense_arr, y, parts, info) -> "CTRTask":
        inputs = (torch.as_tensor(sparse, dtype=torch.long),)
        if info["dense"]:
            inputs += (torch.as_tensor(np.asarray(dense_arr, np.float32)),)
        full = Split(inputs, torch.as_tensor(y, dtype=torch.float32))
        splits = {k: full.take(np.sort(p)) for k, p in zip(("train", "val", "test"), parts)}
        return cls(dataset=dataset, splits=splits, info=info)

    def build_baseline(self, seed: int = 0):
        torch.manual_seed(seed)
        cfg = DeepFMConfig(vocab_sizes=self.info["vocab_sizes"], num_dense=len(self.info["dense"]))
        return DeepFM(cfg), {"arch": "deepfm", "config": cfg.model_dump(mode="json")}

    def train_config(self, budget: str = "full") -> TrainConfig:
        epochs = {"full": 2.0, "demo": 1.0, "test": 0.2}.get(budget, 1.0)
        return TrainConfig(epochs=epochs, batch_size=256, lr=2e-3, weight_decay=1e-5)

    def loss(self, outputs, labels):
        return torch.nn.functional.binary_cross_entropy_with_logits(outputs, labels)

    def metrics(self, outputs, labels):
        prob = 1.0 / (1.0 + np.exp(-outputs.astype(np.float64)))
        auc = roc_auc_score(labels, prob) if 0 < labels.mean() < 1 else float("nan")
        return {"auc": float(auc), "logloss": float(log_loss(labels, np.clip(prob, 1e-7, 1 - 1e-7),
                                                               labels=[0, 1]))}

    def agreement(self, baseline, other):
        pb, po = (1.0 / (1.0 + np.exp(-a.astype(np.float64))) for a in (baseline, other))
        d = np.abs(pb - po)
        return {"decision_agreement": float(((pb > 0.5) == (po > 0.5)).mean()),
                "max_abs_prob_diff": float(d.max()), "mean_abs_prob_diff": float(d.mean())}


def _encode_categorical(df: pd.DataFrame, cols: list[str], train_idx: np.ndarray):
    """Ids from the training rows' vocabulary; 0 is the shared row for unseen values."""
    sparse = np.zeros((len(df), len(cols)), dtype=np.int64)
    vocabs = []
    for j, c in enumerate(cols):
        values = np.array(["<missing>" if pd.isna(v) else str(v) for v in df[c]], dtype=object)
        vocab = sorted(set(values[train_idx]))
        index = {v: i + 1 for i, v in enumerate(vocab)}
        sparse[:, j] = [index.get(v, 0) for v in values]
        vocabs.append(vocab)
    return sparse, vocabs


def _encode_dense(df: pd.DataFrame, cols: list[str], train_idx: np.ndarray, source: str):
    if not cols:
        return np.zeros((len(df), 0), np.float32), []
    out, norm = np.zeros((len(df), len(cols)), np.float32), []
    for j, c in enumerate(cols):
        try:
            x = pd.to_numeric(df[c], errors="raise").astype(float).fillna(0.0).to_numpy()
        except (ValueError, TypeError):
            raise DataError(f"{source}: dense column {c!r} is not numeric.",
                            "Pass it with --categorical instead, or clean it.") from None
        log = bool(x.min() >= 0)
        if log:
            x = np.log1p(x)
        mu, sd = float(x[train_idx].mean()), float(x[train_idx].std()) or 1.0
        out[:, j] = (x - mu) / sd
        norm.append({"column": c, "log1p": log, "mean": mu, "std": sd})
    return out, norm
