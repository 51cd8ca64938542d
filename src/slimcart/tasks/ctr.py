"""Click / conversion prediction with one embedding table per categorical field (DeepFM)."""
from __future__ import annotations

from dataclasses import dataclass, field
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
from ..models.dlrm import DLRM, DLRMConfig
from .base import Split, Task, TrainConfig
from .common import split_indices

DATASETS = {
    "womens-reviews": "women's clothing reviews, label Recommended IND (CC0)",
    "online-shoppers": "online shoppers' sessions, label Revenue (CC-BY-4.0)",
    "synthetic": "generated click log with a planted ground truth; synthetic:rows=..,fields=..,vocab=..",
}
BASELINES = {"deepfm": "DeepFM: FM term + MLP over the embeddings (default)",
             "dlrm": "DLRM: bottom MLP over dense features, pairwise dot products, top MLP"}
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
    features = list(categorical) + list(dense or [])
    if label_column in features:
        raise UsageError(f"{path}: the label column {label_column!r} is also named as a feature "
                         "(--categorical/--dense); the model would see the answer.",
                         "Leave the label column out of --categorical and --dense.")
    twice = sorted({c for c in features if features.count(c) > 1})
    if twice:
        raise UsageError(f"{path}: column(s) {', '.join(map(repr, twice))} named more than once in "
                         "--categorical/--dense.", "Name each feature column once.")
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


def synthetic_split(n: int, seed: int) -> list[np.ndarray]:
    """Train / val / test row indices (80 / 10 / 10 %) of a generated click log of n rows."""
    return np.split(np.random.default_rng(seed).permutation(n), [int(0.8 * n), int(0.9 * n)])


@dataclass
class CTRTask(Task):
    name = "ctr"
    metric_names = ("auc", "logloss")
    primary_metric = "auc"
    vocabularies: list | None = field(default=None, repr=False, compare=False)  # see _vocabularies

    @property
    def input_names(self) -> tuple[str, ...]:  # type: ignore[override]
        return ("sparse", "dense") if self.info["dense"] else ("sparse",)

    @classmethod
    def load(cls, dataset: str = "womens-reviews", data_dir=None, categorical=None, dense=None,
             label_column: str | None = None, seed: int = 0, baseline: str | None = None,
             **_: Any) -> "CTRTask":
        """``baseline``: the architecture ``train_baseline`` builds, deepfm (default) or dlrm."""
        if baseline is not None and baseline not in BASELINES:
            raise UsageError(f"Unknown ctr baseline {baseline!r}.{closest(str(baseline), list(BASELINES))}",
                             f"Known ctr baselines: {', '.join(BASELINES)}.")
        task = cls._load(dataset, data_dir, categorical, dense, label_column, seed)
        task.info["baseline"] = baseline or "deepfm"
        return task

    @classmethod
    def _load(cls, dataset, data_dir, categorical, dense, label_column, seed) -> "CTRTask":
        if dataset.split(":")[0] == "synthetic":
            return cls._synthetic(dataset, seed)
        df, cat_cols, dense_cols, label, source = _table_dataset(dataset, data_dir, categorical,
                                                                 dense, label_column)
        y = _binary_labels(df[label], source)
        tr, va, te = split_indices(y.astype(int), (0.1, 0.1), seed, source=source)
        sparse, vocabs = _encode_categorical(df, cat_cols, tr)
        dense_arr, norm = _encode_dense(df, dense_cols, tr, source)
        info = {"categorical": cat_cols, "dense": dense_cols, "label_column": label,
                "vocab_sizes": [len(v) + 1 for v in vocabs], "source": source,
                "positive_rate": float(y.mean()), "dense_norm": norm, "split_seed": seed}
        task = cls._from_arrays(dataset if dataset in DATASETS else source, sparse, dense_arr, y,
                                (tr, va, te), info)
        task.vocabularies = _vocabularies(df, cat_cols, vocabs)
        return task

    @classmethod
    def _synthetic(cls, dataset: str, seed: int) -> "CTRTask":
        from ..data import synthetic

        spec = synthetic.parse_spec(dataset)
        log = synthetic.generate(spec)
        tr, va, te = synthetic_split(len(log.labels), seed)
        info = {"categorical": [f"f{i}" for i in range(spec.fields)],
                "dense": [f"d{i}" for i in range(spec.dense)], "label_column": "click",
                "vocab_sizes": [spec.vocab] * spec.fields, "source": "generated",
                "positive_rate": float(log.labels.mean()), "synthetic": spec.__dict__,
                "ceiling_auc": float(log.ceiling_auc()), "split_seed": seed}
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
        if self.info.get("baseline") == "dlrm":
            cfg = DLRMConfig(vocab_sizes=self.info["vocab_sizes"], num_dense=len(self.info["dense"]))
            return DLRM(cfg), {"arch": "dlrm", "config": cfg.model_dump(mode="json")}
        cfg = DeepFMConfig(vocab_sizes=self.info["vocab_sizes"], num_dense=len(self.info["dense"]))
        return DeepFM(cfg), {"arch": "deepfm", "config": cfg.model_dump(mode="json")}

    def train_config(self, budget: str = "full") -> TrainConfig:
        """Row-wise Adagrad on the tables (sparse updates), AdamW on the rest, frequency-aware L2
        on the rows, and early stopping on the validation AUC (see BENCHMARKS.md, "CTR baseline")."""
        epochs = {"full": 10.0, "demo": 3.0, "test": 0.2}.get(budget, 3.0)
        return TrainConfig(epochs=epochs, batch_size=1024, lr=2e-3, weight_decay=1e-5,
                           table_optimizer="rowwise_adagrad", table_lr=0.1, row_l2=20.0,
                           patience=2 if epochs >= 2 else None)

    def default_terms(self, model, cfg: TrainConfig) -> list:
        from .ctr_reg import frequency_l2

        terms = super().default_terms(model, cfg)
        if cfg.row_l2 > 0:
            term = frequency_l2(model, self.splits["train"].inputs[0], cfg.row_l2)
            if term is not None:
                terms.append(term)
        return terms

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

    def serving_spec(self):
        info = self.info
        if "synthetic" in info:  # generated ids: every id in [0, vocab) is a trained row, none is a fallback
            return {"kind": "ids", "categorical": info["categorical"], "vocab_sizes": info["vocab_sizes"],
                    "dense": info["dense"], "label_column": info["label_column"],
                    "out_of_range": "error"}
        if self.vocabularies is None:
            raise UsageError("This ctr task holds no vocabularies; load it with CTRTask.load to save a bundle.")
        return {"kind": "table", "label_column": info["label_column"], "vocab": "vocab.json",
                "categorical": [{"column": v["column"], "kind": v["kind"]} for v in self.vocabularies],
                "derived": _DERIVED.get(self.dataset, {}), "missing": "<missing>", "fallback_id": 0,
                "dense": info["dense_norm"], "dense_missing": 0.0}

    def write_serving_files(self, folder):
        import json

        if "synthetic" in self.info:
            return []
        vocab = {v["column"]: v["ids"] for v in self.vocabularies or []}
        (Path(folder) / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
        return ["vocab.json"]


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


# Columns _table_dataset derives from a shipped table: name -> source column and divisor.
_DERIVED = {"womens-reviews": {"Age bucket": {"from": "Age", "floordiv": 10, "dtype": "Int64"}}}


def _vocabularies(df: pd.DataFrame, cols: list[str], vocabs: list[list[str]]) -> list[dict[str, Any]]:
    """Per categorical column: its value kind (how serving normalises raw values before str())
    and value -> id as _encode_categorical numbers them (0 is the fallback)."""
    out = []
    for c, vocab in zip(cols, vocabs):
        dt = df[c].dtype
        kind = ("bool" if pd.api.types.is_bool_dtype(dt) else
                "integer" if pd.api.types.is_integer_dtype(dt) else
                "float" if dt == np.float64 else "string")
        out.append({"column": c, "kind": kind, "ids": {v: i + 1 for i, v in enumerate(vocab)}})
    return out
