"""Frequency-aware L2 on the embedding rows of a CTR model.

Each lookup of row i in a batch of B rows adds ``||w_i||^2 / (B * count_i)`` (count_i: how often
id i occurs in the training split), so over an epoch every row gets the same penalty
``||w_i||^2 / N`` whatever its frequency: the MAP estimate under one Gaussian prior per row. A
row seen twice is held near 0; a row seen ten thousand times is free to move. Plain weight decay
on touched rows does the opposite (frequent rows are decayed most), and AdamW's decay shrinks
every row at every step, rare rows included, between their visits.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..trainer import Batch, LossTerm


def inverse_counts(ids: Tensor, rows: int) -> Tensor:
    """1 / (how often each of ``rows`` ids occurs in ``ids``), 1 for ids that never occur."""
    return 1.0 / torch.bincount(ids, minlength=rows).clamp(min=1).float()


class FrequencyL2(LossTerm):
    """``weight`` x the mean over the batch of sum_tables ||row||^2 / count(row)."""

    name = "row_l2"

    def __init__(self, tables: list[tuple[int, nn.Embedding, Tensor]], weight: float):
        self.tables, self.weight = tables, float(weight)  # (input column, table, 1 / count per row)

    def __call__(self, batch: Batch, model: nn.Module) -> Tensor:
        ids = batch.inputs[0]
        total = None
        for col, table, inv in self.tables:
            rows = ids[:, col]
            e = F.embedding(rows, table.weight, sparse=table.sparse)
            part = (e.pow(2).sum(1) * inv[rows]).sum()
            total = part if total is None else total + part
        return total / max(1, ids.shape[0])


def frequency_l2(model: nn.Module, sparse_train: Tensor, weight: float) -> FrequencyL2 | None:
    """The term for a DeepFM-like model (``embeddings`` and ``linear_embeddings``, one table per
    input column) whose tables are plain ``nn.Embedding`` of the vocabulary's size; tables that were
    replaced (row-pruned, quantized, shared) are left out. None when no table qualifies."""
    tables = []
    for attr in ("embeddings", "linear_embeddings"):
        for col, table in enumerate(getattr(model, attr, None) or []):
            w = table._parameters.get("weight") if isinstance(table, nn.Embedding) else None
            if not isinstance(w, nn.Parameter) or not w.requires_grad or col >= sparse_train.shape[1]:
                continue
            inv = inverse_counts(sparse_train[:, col], table.num_embeddings)
            if inv.numel() != table.num_embeddings:
                continue
            tables.append((col, table, inv.to(w.dtype)))
    return FrequencyL2(tables, weight) if tables else None
