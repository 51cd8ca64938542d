"""Row-pruned embedding tables: a compact table plus a map from original id to compact row.

``CompactEmbedding(num_ids, kept_rows, dim)`` stands in for ``nn.Embedding(num_ids, dim)``.
Its ``weight`` has ``kept_rows + 1`` rows: row 0 is the shared fallback row that every dropped
id reads, rows 1.. hold the kept ids' vectors unchanged, in ascending id order. ``id_map``
(int32 [num_ids], a buffer, so it is saved with the weights) sends each original id to its
compact row. Forward is two lookups (ONNX: Gather of Gather).

Bytes: the map costs 4 bytes per original id, a float32 row ``4 * dim``. A table with its own
map shrinks only when more than ``1 / dim`` of its rows are dropped, and a dim-1 table never
would. So a DeepFM field's first-order table (dim 1) has no map of its own: it reads the map of
the field's second-order table, and the field costs ``4 * ((kept_rows + 1) * (dim + 1) +
num_ids)`` bytes instead of ``4 * num_ids * (dim + 1)``; that pays once more than
``1 / (dim + 1)`` of the ids are dropped.

The fallback row is the count-weighted mean of the dropped rows (the plain mean when none of
them was seen in training): of all single vectors it is the closest, in squared error summed
over the training rows that now read it, to the vectors those rows read before. The old row 0
would be a poor choice: in tables built from a training vocabulary, id 0 (unseen values) never
occurs in training, so its row is still at its random initialisation.

A saved model's spec carries ``"row_pruning": {"fields": [{"field", "num_ids", "kept_rows",
"shared_linear"}, ...]}``; ``apply_row_pruning`` rebuilds the compact tables from it, so the
saved state dict loads strictly. A text model's vocabulary-pruned word-embedding table
(prune/vocab.py) is one such table at a module path: ``"vocab_pruning": {"module", "num_ids",
"kept_rows"}``, rebuilt by ``apply_vocab_pruning``.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ModelError


class CompactEmbedding(nn.Module):
    """``nn.Embedding(num_ids, dim)`` with all but ``kept_rows`` ids sharing one fallback row.

    With ``map_from`` the module owns no map and reads that module's ``id_map`` (both tables
    of a field then share one map, stored once).
    """

    def __init__(self, num_ids: int, kept_rows: int, dim: int,
                 map_from: "CompactEmbedding | None" = None):
        super().__init__()
        if not 0 <= kept_rows <= num_ids:
            raise ValueError(f"kept_rows must be in [0, {num_ids}], got {kept_rows}")
        self.num_ids, self.kept_rows, self.dim = num_ids, kept_rows, dim
        self.weight = nn.Parameter(torch.zeros(kept_rows + 1, dim))
        if map_from is None:
            self.register_buffer("id_map", torch.zeros(num_ids, dtype=torch.int32))
        elif (map_from.num_ids, map_from.kept_rows) != (num_ids, kept_rows) or map_from.shared:
            raise ValueError("map_from must own a map of the same num_ids and kept_rows")
        # a plain attribute, not a submodule: the shared map appears once in the state dict
        object.__setattr__(self, "_map_from", map_from)

    @property
    def shared(self) -> bool:
        return self._map_from is not None

    def mapping(self) -> torch.Tensor:
        return self._map_from.id_map if self._map_from is not None else self.id_map

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(self.mapping()[ids].long(), self.weight)

    def extra_repr(self) -> str:
        return (f"{self.num_ids} ids -> {self.kept_rows} kept rows + 1 fallback, dim {self.dim}"
                + (", shared id map" if self.shared else ""))


def id_map_for(num_ids: int, keep_ids: np.ndarray) -> torch.Tensor:
    """int32 map: kept ids (ascending) -> 1..K, every other id -> 0 (the fallback row)."""
    keep = np.unique(np.asarray(keep_ids, dtype=np.int64))
    if keep.size and (keep[0] < 0 or keep[-1] >= num_ids):
        raise ValueError(f"kept ids must lie in [0, {num_ids})")
    out = np.zeros(num_ids, dtype=np.int32)
    out[keep] = np.arange(1, keep.size + 1, dtype=np.int32)
    return torch.from_numpy(out)


def compact_weight(weight: torch.Tensor, id_map: torch.Tensor,
                   counts: np.ndarray | None = None, fallback: torch.Tensor | None = None) -> torch.Tensor:
    """The compact table for ``weight`` under ``id_map``; row 0 is ``fallback`` when given,
    else the mean of the dropped rows (see module doc)."""
    weight = weight.detach()
    kept = id_map > 0
    out = weight.new_zeros(int(kept.sum()) + 1, weight.shape[1])
    out[id_map[kept].long()] = weight[kept]
    dropped = weight[~kept]
    if fallback is not None:
        out[0] = fallback.detach().to(weight.dtype)
    elif dropped.shape[0]:
        w = None if counts is None else torch.as_tensor(counts, dtype=torch.float64)[~kept]
        if w is None or float(w.sum()) == 0.0:
            w = torch.ones(dropped.shape[0], dtype=torch.float64)
        out[0] = ((dropped.double() * w[:, None]).sum(0) / w.sum()).to(weight.dtype)
    return out


def field_tables(model: nn.Module, field: int) -> tuple[nn.Module, nn.Module | None]:
    """A field's second-order table and its first-order table (None if the model has none)."""
    emb = model.embeddings[field]
    linear = getattr(model, "linear_embeddings", None)
    lin = linear[field] if isinstance(linear, nn.ModuleList) and field < len(linear) else None
    return emb, lin


def shares_map(lin: nn.Module | None, num_ids: int) -> bool:
    """Whether a first-order table can be keyed by the map of a ``num_ids`` table."""
    return isinstance(lin, nn.Embedding) and lin.num_embeddings == num_ids


def compact_table(emb: nn.Embedding, keep_ids: np.ndarray, counts: np.ndarray | None = None,
                  fallback: torch.Tensor | None = None) -> CompactEmbedding:
    """A CompactEmbedding keeping ``keep_ids`` of ``emb`` (their rows copied as they are)."""
    id_map = id_map_for(emb.num_embeddings, keep_ids)
    new = CompactEmbedding(emb.num_embeddings, int((id_map > 0).sum()), emb.embedding_dim)
    with torch.no_grad():
        new.id_map.copy_(id_map)
        new.weight.copy_(compact_weight(emb.weight, id_map, counts, fallback))
    return new.to(device=emb.weight.device, dtype=emb.weight.dtype)


def compact_field(model: nn.Module, field: int, keep_ids: np.ndarray,
                  counts: np.ndarray | None = None) -> dict[str, Any]:
    """Replace field ``field``'s tables by compact ones keeping ``keep_ids``; return its record."""
    emb, lin = field_tables(model, field)
    new = compact_table(emb, keep_ids, counts)
    id_map, kept = new.id_map, new.kept_rows
    model.embeddings[field] = new
    shared = shares_map(lin, emb.num_embeddings)
    if shared:
        new_lin = CompactEmbedding(lin.num_embeddings, kept, lin.embedding_dim, map_from=new)
        with torch.no_grad():
            new_lin.weight.copy_(compact_weight(lin.weight, id_map, counts))
        model.linear_embeddings[field] = new_lin.to(lin.weight.device)
    return {"field": field, "num_ids": emb.num_embeddings, "kept_rows": kept,
            "shared_linear": shared}


def apply_row_pruning(model: nn.Module, record: dict[str, Any]) -> nn.Module:
    """Give a freshly built model the compact tables of ``record`` (weights load afterwards)."""
    for entry in record.get("fields", []):
        i = int(entry["field"])
        tables = getattr(model, "embeddings", None)
        if not isinstance(tables, nn.ModuleList) or not 0 <= i < len(tables):
            raise ModelError(f"row_pruning names field {i}, which the model does not have.")
        emb, lin = field_tables(model, i)
        if not isinstance(emb, nn.Embedding) or emb.num_embeddings != entry["num_ids"]:
            raise ModelError(f"row_pruning field {i}: expected an nn.Embedding of "
                             f"{entry['num_ids']} ids, found {emb}.")
        new = CompactEmbedding(entry["num_ids"], int(entry["kept_rows"]), emb.embedding_dim)
        model.embeddings[i] = new
        if entry.get("shared_linear"):
            if not shares_map(lin, entry["num_ids"]):
                raise ModelError(f"row_pruning field {i}: the first-order table does not match.")
            model.linear_embeddings[i] = CompactEmbedding(
                entry["num_ids"], int(entry["kept_rows"]), lin.embedding_dim, map_from=new)
    return model


def apply_vocab_pruning(model: nn.Module, record: dict[str, Any]) -> nn.Module:
    """Give a freshly built text model the compact word-embedding table of ``record``."""
    try:
        name, num_ids, kept = record["module"], int(record["num_ids"]), int(record["kept_rows"])
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        old = parent.get_submodule(child)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ModelError(f"vocab_pruning: the saved record {record!r} does not fit this model "
                         f"({type(exc).__name__}: {exc}).") from None
    if not isinstance(old, nn.Embedding) or old.num_embeddings != num_ids:
        raise ModelError(f"vocab_pruning: expected an nn.Embedding of {num_ids} ids at {name}, "
                         f"found {old}.")
    try:
        parent._modules[child] = CompactEmbedding(num_ids, kept, old.weight.shape[1])
    except ValueError as exc:
        raise ModelError(f"vocab_pruning: the saved record is invalid: {exc}") from None
    return model


def table_bytes(model: nn.Module) -> int:
    """Bytes of every embedding table of the model, id maps included."""
    total = 0
    for name in ("embeddings", "linear_embeddings"):
        mod = getattr(model, name, None)
        if isinstance(mod, nn.Module):
            total += sum(t.numel() * t.element_size() for t in mod.state_dict().values())
    return total
