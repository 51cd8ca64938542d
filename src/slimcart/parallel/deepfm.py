"""DeepFM with its embedding tables (``embeddings`` and ``linear_embeddings``) sharded over the
ranks of a process group; the FM term, the dense layer and the MLP are replicated on every rank."""
from __future__ import annotations

import copy
from typing import Mapping

import torch
from torch import nn

from ..errors import UsageError
from ..models.deepfm import DeepFM, DeepFMConfig, deepfm_head
from .plan import ShardingPlan
from .sharded import ShardedEmbeddingCollection

PREFIXES = ("embeddings", "linear_embeddings")


def deepfm_tables(model: DeepFM) -> dict[str, tuple[int, int, int]]:
    """The tables of a DeepFM for ``plan_tables``: name -> (rows, dim, bytes per row)."""
    out = {}
    for prefix in PREFIXES:
        for i, emb in enumerate(getattr(model, prefix)):
            rows, dim = emb.weight.shape
            out[f"{prefix}.{i}"] = (rows, dim, dim * emb.weight.element_size())
    return out


def deepfm_config(model: DeepFM) -> DeepFMConfig:
    """The configuration a DeepFM was built from, read off its layers."""
    linears = [m.out_features for m in model.mlp if isinstance(m, nn.Linear)]
    drops = [m.p for m in model.mlp if isinstance(m, nn.Dropout)]
    return DeepFMConfig(vocab_sizes=[e.num_embeddings for e in model.embeddings],
                        num_dense=model.num_dense, embed_dim=model.embeddings[0].embedding_dim,
                        hidden=linears[:-1], dropout=drops[0] if drops else 0.0)


class ShardedDeepFM(nn.Module):
    """Same outputs as the DeepFM it was made from; each rank holds only its shards of the tables.

    ``cfg`` gives the table shapes; the rows come from ``weights`` (full tables) or ``shards``
    (this rank's rows); the dense layers are copied from ``dense_from``, a DeepFM of the same
    config except, possibly, its vocabulary sizes."""

    def __init__(self, cfg: DeepFMConfig, plan: ShardingPlan, dense_from: DeepFM, group=None,
                 weights: Mapping[str, torch.Tensor] | None = None,
                 shards: Mapping[str, torch.Tensor] | None = None):
        super().__init__()
        self.config = cfg
        shapes = {f"{prefix}.{i}": (rows, dim) for prefix, dim in zip(PREFIXES, (cfg.embed_dim, 1))
                  for i, rows in enumerate(cfg.vocab_sizes)}
        for name, (rows, dim) in shapes.items():
            p = plan.tables.get(name)
            if p is None or (p.rows, p.dim) != (rows, dim):
                got = "missing" if p is None else f"{p.rows} x {p.dim}"
                raise UsageError(f"The sharding plan does not fit the model: table {name!r} is "
                                 f"{rows} x {dim} in the model, {got} in the plan.",
                                 "Make the plan with plan_tables(deepfm_tables(model), world_size).")
        self.tables = ShardedEmbeddingCollection(
            plan, list(shapes), weights=weights, shards=shards, group=group,
            dtype=dense_from.bias.dtype, device=dense_from.bias.device)
        self.num_fields, self.num_dense = len(cfg.vocab_sizes), cfg.num_dense
        self.dense_linear = copy.deepcopy(dense_from.dense_linear)
        self.mlp = copy.deepcopy(dense_from.mlp)
        self.bias = nn.Parameter(dense_from.bias.detach().clone())

    def dense_state(self) -> dict[str, torch.Tensor]:
        """The replicated parameters, under the same keys as in ``DeepFM.state_dict()``."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("tables.")}

    def forward(self, sparse: torch.Tensor, dense: torch.Tensor | None = None) -> torch.Tensor:
        f = self.num_fields
        rows = self.tables.lookup({f"{p}.{i}": sparse[:, i] for p in PREFIXES for i in range(f)})
        if self.training:
            self.last_rows = rows  # for a regulariser on the looked-up rows (train_sharded's row_l2)
        emb = torch.stack([rows[f"embeddings.{i}"] for i in range(f)], dim=1)
        first = torch.cat([rows[f"linear_embeddings.{i}"] for i in range(f)], 1).sum(1)
        return deepfm_head(self, emb, first, dense)


def shard_deepfm(model: DeepFM, plan: ShardingPlan, group=None) -> ShardedDeepFM:
    """A copy of ``model`` whose tables are split over the ranks of ``group`` as ``plan`` says.

    Call it on every rank with the same model weights; each rank keeps only its own rows."""
    if not isinstance(model, DeepFM):
        raise UsageError(f"shard_deepfm needs a DeepFM, got {type(model).__name__}.",
                         "For other models, use ShardedEmbeddingCollection directly.")
    weights = {n: model.get_submodule(n).weight for n in deepfm_tables(model)}
    return ShardedDeepFM(deepfm_config(model), plan, model, group=group, weights=weights)
