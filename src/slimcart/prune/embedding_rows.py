"""Embedding-row pruning: drop the rows of rare (or small-norm) ids from each categorical
field's tables; every dropped id then reads one shared fallback row.

Which rows stay, per table of V ids:

- ``criterion: frequency, min_count: c``: the ids seen at least c times in the training split;
- ``criterion: frequency, keep_ratio: r``: the round(r * V) most frequent ids;
- ``criterion: norm, keep_ratio: r``: the round(r * V) ids whose second-order vector has the
  largest L2 norm.

Ties go to the lower id. A field is left alone when nothing would be dropped or when the
compact tables plus their id map would not take fewer bytes than the dense tables (see
models/compact_embedding.py for the byte count and the fallback row).
"""
from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from pydantic import Field
from torch import nn

from ..errors import UsageError
from ..models.compact_embedding import (CompactEmbedding, compact_field, field_tables, shares_map,
                                        table_bytes)
from ..registry import TORCH, TechniqueConfig, register
from ..stage import ModelState, StageContext, StageReport


class EmbeddingRowPruneConfig(TechniqueConfig):
    criterion: Literal["frequency", "norm"] = "frequency"
    min_count: int | None = Field(default=None, ge=1)
    keep_ratio: float | None = Field(default=None, gt=0.0, le=1.0)
    fields: list[int] | None = None            # field indices; None: every field

    def model_post_init(self, _ctx) -> None:
        if (self.min_count is None) == (self.keep_ratio is None):
            raise ValueError("give exactly one of min_count (an integer >= 1) "
                             "or keep_ratio (in (0, 1])")
        if self.min_count is not None and self.criterion != "frequency":
            raise ValueError("min_count goes with criterion 'frequency'; "
                             "use keep_ratio with 'norm'")
        if self.fields is not None:
            if not self.fields:
                raise ValueError("fields is empty; leave it out to prune every field")
            if min(self.fields) < 0 or len(set(self.fields)) != len(self.fields):
                raise ValueError("fields must be distinct non-negative field indices")


def keep_ids(cfg: EmbeddingRowPruneConfig, counts: np.ndarray, weight: torch.Tensor) -> np.ndarray:
    """Sorted ids of the rows to keep in one table."""
    if cfg.min_count is not None:
        return np.flatnonzero(counts >= cfg.min_count)
    num_ids = len(counts)
    k = min(num_ids, max(1, int(round(cfg.keep_ratio * num_ids))))
    score = counts if cfg.criterion == "frequency" else weight.detach().norm(dim=1).double().numpy()
    return np.sort(np.argsort(-score, kind="stable")[:k])


def _training_ids(ctx: StageContext, fields: int) -> np.ndarray:
    split = getattr(ctx.task, "splits", {}).get("train")
    ids = split.inputs[0] if split is not None and split.inputs else None
    if not (isinstance(ids, torch.Tensor) and ids.dim() == 2 and ids.shape[1] == fields
            and not ids.is_floating_point()):
        raise UsageError(f"embedding_row_prune needs a task whose first input is the "
                         f"[rows, {fields}] integer id matrix (a ctr task); {ctx.task.name!r} "
                         "has none.")
    return ids.numpy()


def _field_bytes(emb: nn.Embedding, lin: nn.Module | None, kept: int) -> tuple[int, int]:
    """(dense bytes, compact bytes) of one field's tables."""
    num_ids, size = emb.num_embeddings, emb.weight.element_size()
    dims, extra = emb.embedding_dim, 0
    if shares_map(lin, num_ids):
        dims += lin.embedding_dim
    elif lin is not None:  # a first-order table left dense
        extra = sum(t.numel() * t.element_size() for t in lin.state_dict().values())
    return num_ids * dims * size + extra, (kept + 1) * dims * size + 4 * num_ids + extra


@register("embedding_row_prune", EmbeddingRowPruneConfig, accepts=(TORCH,),
          summary="drop rare or small-norm embedding rows; dropped ids share a fallback row")
def embedding_row_prune(state: ModelState, cfg: EmbeddingRowPruneConfig,
                        ctx: StageContext) -> StageReport:
    report = StageReport("embedding_row_prune", cfg.model_dump())
    model = state.torch_model
    tables = getattr(model, "embeddings", None)
    if not isinstance(tables, nn.ModuleList) or not all(
            isinstance(t, (nn.Embedding, CompactEmbedding)) for t in tables) or not len(tables):
        raise UsageError("embedding_row_prune: expected a model with an `embeddings` ModuleList of "
                         "nn.Embedding tables, one per categorical field (DeepFM); "
                         f"{type(model).__name__} has none.")
    fields = list(range(len(tables))) if cfg.fields is None else list(cfg.fields)
    if max(fields) >= len(tables):
        raise UsageError(f"embedding_row_prune: field {max(fields)} does not exist; the model has "
                         f"{len(tables)} fields (0 to {len(tables) - 1}).")
    ids = _training_ids(ctx, len(tables))
    names = list(getattr(ctx.task, "info", {}).get("categorical", []))
    rows_before = sum(t.weight.shape[0] for t in tables)
    bytes_before = table_bytes(model)
    remapped = np.zeros(len(ids), dtype=bool)
    record = [dict(e) for e in state.spec.get("row_pruning", {}).get("fields", [])]
    for i in fields:
        key = f"embeddings.{i}" + (f" ({names[i]})" if i < len(names) else "")
        emb, lin = field_tables(model, i)
        if isinstance(emb, CompactEmbedding):
            report.skipped[key] = "already row-pruned"
            continue
        if emb.padding_idx is not None or emb.max_norm is not None:
            report.skipped[key] = "has padding_idx or max_norm, which a compact table does not keep"
            continue
        num_ids = emb.num_embeddings
        col = ids[:, i]
        if col.size and (col.min() < 0 or col.max() >= num_ids):
            raise UsageError(f"embedding_row_prune: training ids of field {i} fall outside "
                             f"[0, {num_ids}); the model does not match the task.")
        counts = np.bincount(col, minlength=num_ids)
        keep = keep_ids(cfg, counts, emb.weight)
        dropped = num_ids - len(keep)
        if dropped == 0:
            report.skipped[key] = f"nothing to drop: all {num_ids} rows pass the criterion"
            continue
        dense, compact = _field_bytes(emb, lin, len(keep))
        if compact >= dense:
            report.skipped[key] = (f"would not shrink: dropping {dropped} of {num_ids} rows gives "
                                   f"{compact} bytes with the id map vs {dense} now")
            continue
        hit = ~np.isin(col, keep)
        remapped |= hit
        record.append(compact_field(model, i, keep, counts))
        report.changed[key] = (f"rows {num_ids} -> {len(keep) + 1} ({len(keep)} kept + fallback), "
                               f"bytes {dense} -> {compact}, "
                               f"{hit.mean():.2%} of training rows remapped")
    record.sort(key=lambda e: e["field"])
    if report.changed:
        state.spec = {**state.spec, "row_pruning": {"fields": record}}
    rows_after = sum(t.weight.shape[0] for t in model.embeddings)
    bytes_after = table_bytes(model)
    report.stats = {"rows_before": rows_before, "rows_after": rows_after,
                    "rows_kept_share": rows_after / rows_before,
                    "embedding_bytes_before": bytes_before, "embedding_bytes_after": bytes_after,
                    "train_rows_remapped_share": float(remapped.mean()) if len(ids) else 0.0,
                    "fields_pruned": len(report.changed)}
    return report
