"""Pieces shared by tasks: splitting, label encoding, classification metrics."""
from __future__ import annotations

import math

import numpy as np
from sklearn.metrics import accuracy_score, f1_score
from sklearn.model_selection import train_test_split

from ..errors import DataError


MIN_ROWS = 10


def split_indices(labels: np.ndarray, fractions: tuple[float, float], seed: int,
                  stratify: bool = True, source: str = "") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """train / val / test indices; ``fractions`` are the val and test shares."""
    idx = np.arange(len(labels))
    val_f, test_f = fractions
    n_rest = math.ceil((val_f + test_f) * len(idx))  # the sizes train_test_split will make
    n_test = math.ceil(test_f / (val_f + test_f) * n_rest) if test_f else 0
    sizes = (len(idx) - n_rest, n_rest - n_test, n_test)
    if len(idx) < MIN_ROWS or min(sizes[:2]) < 1 or (test_f and sizes[2] < 1):
        raise DataError(f"{source or 'The data'}: {len(idx)} row(s) are too few to split into train, "
                        f"validation{' and test' if test_f else ''} parts; at least {MIN_ROWS} rows "
                        "are needed, with at least one row in each part.",
                        "Use a larger table.")
    strat = labels if stratify and _can_stratify(labels, val_f + test_f) else None
    train, rest = train_test_split(idx, test_size=val_f + test_f, random_state=seed, stratify=strat)
    if test_f == 0:
        return train, rest, np.array([], dtype=int)
    strat = labels[rest] if strat is not None and _can_stratify(labels[rest], test_f / (val_f + test_f)) else None
    val, test = train_test_split(rest, test_size=test_f / (val_f + test_f), random_state=seed, stratify=strat)
    return np.sort(train), np.sort(val), np.sort(test)


def _can_stratify(labels: np.ndarray, share: float) -> bool:
    """Whether a stratified split works: two rows per class, one per class on each side."""
    _, counts = np.unique(labels, return_counts=True)
    n = len(labels)
    return counts.min() >= 2 and share * n >= len(counts) and n - math.ceil(share * n) >= len(counts)


def encode_labels(values, source: str, min_classes: int = 2) -> tuple[np.ndarray, list[str]]:
    arr = np.asarray(values)
    if any(v is None or (isinstance(v, float) and np.isnan(v)) for v in arr):
        raise DataError(f"{source}: the label column has empty values.",
                        "Drop or fill the rows without a label.")
    classes = sorted({str(v) for v in arr})
    if len(classes) < min_classes:
        raise DataError(f"{source}: the label column has {len(classes)} class(es); "
                        f"at least {min_classes} are needed.")
    index = {c: i for i, c in enumerate(classes)}
    return np.array([index[str(v)] for v in arr], dtype=np.int64), classes


def classification_metrics(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    pred = logits.argmax(1)
    return {"accuracy": float(accuracy_score(labels, pred)),
            "macro_f1": float(f1_score(labels, pred, average="macro", zero_division=0))}


def classification_agreement(base: np.ndarray, other: np.ndarray) -> dict[str, float]:
    """Top-1 agreement and the largest logit difference against the baseline."""
    diff = np.abs(base - other)
    return {"top1_agreement": float((base.argmax(1) == other.argmax(1)).mean()),
            "max_abs_logit_diff": float(diff.max()),
            "mean_abs_logit_diff": float(diff.mean())}


class ClassificationMixin:
    """Loss, metrics and agreement shared by the classification tasks."""

    def loss(self, outputs, labels):
        import torch

        return torch.nn.functional.cross_entropy(outputs, labels)

    def metrics(self, outputs, labels):
        return classification_metrics(outputs, labels)

    def agreement(self, baseline, other):
        return classification_agreement(baseline, other)
