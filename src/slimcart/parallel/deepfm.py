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
    """The tables of a DeepFM for ``plan_tables``: name -> (rows, dim, bytes per row). A row-pruned
    table (CompactEmbedding) counts its compact rows: those are what gets sharded."""
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
    return DeepFMConfig(vocab_sizes=[e.weight.shape[0] for e in model.embeddings],
                        num_dense=model.num_dense, embed_dim=model.embeddings[0].weight.shape[1],
                        hidden=linears[:-1], dropout=drops[0] if drops else 0.0)


class ShardedDeepFM(nn.Module):
    """Same outputs as the DeepFM it was made from; each rank holds only its shards of the tables.

    ``cfg`` gives the table shapes; the rows come from ``weights`` (full tables) or ``shards``
    (this rank's rows); the dense layers are copied from ``dense_from``, a DeepFM of the same
    config except, possibly, its vocabulary sizes.

    Row-pruned fields (``slimcart.models.compact_embedding``) come with ``id_maps``: field -> int32
    map from original id to compact row; ``cfg.vocab_sizes`` then counts the compact rows, and each
    rank maps its ids (the map is replicated: 4 bytes per original id) before routing them."""

    def __init__(self, cfg: DeepFMConfig, plan: ShardingPlan, dense_from: DeepFM, group=None,
                 weights: Mapping[str, torch.Tensor] | None = None,
                 shards: Mapping[str, torch.Tensor] | None = None,
                 id_maps: Mapping[int, torch.Tensor] | None = None):
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
        self.id_maps = nn.Module()
        for field, m in sorted((id_maps or {}).items()):
            field = int(field)
            if not 0 <= field < len(cfg.vocab_sizes) or m.dim() != 1 or m.is_floating_point():
                raise UsageError(f"id_maps[{field}]: need a 1-D integer map for one of the "
                                 f"{len(cfg.vocab_sizes)} fields, got {tuple(m.shape)} {m.dtype}.")
            if m.numel() and (int(m.min()) < 0 or int(m.max()) >= cfg.vocab_sizes[field]):
                raise UsageError(f"id_maps[{field}] points outside the field's {cfg.vocab_sizes[field]} "
                                 "compact rows.", "Build it with the compact table it belongs to.")
            self.id_maps.register_buffer(str(field), m.detach().to(torch.int32).clone())

    def map_ids(self, sparse: torch.Tensor) -> torch.Tensor:
        """The rows the ids read: row-pruned fields go through their id map."""
        if not len(self.id_maps._buffers):
            return sparse
        cols = []
        for i in range(self.num_fields):
            m = self.id_maps._buffers.get(str(i))
            col = sparse[:, i]
            if m is not None:
                if col.numel() and (int(col.min()) < 0 or int(col.max()) >= m.numel()):
                    raise UsageError(f"Ids of field {i} must be in [0, {m.numel()}); got values from "
                                     f"{int(col.min())} to {int(col.max())}.",
                                     "Map unseen or out-of-range ids to a valid id before the lookup.")
                col = m[col].long()
            cols.append(col)
        return torch.stack(cols, 1)

    def dense_state(self) -> dict[str, torch.Tensor]:
        """The replicated parameters, under the same keys as in ``DeepFM.state_dict()``."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("tables.")}

    def forward(self, sparse: torch.Tensor, dense: torch.Tensor | None = None) -> torch.Tensor:
        f = self.num_fields
        sparse = self.map_ids(sparse)
        rows = self.tables.lookup({f"{p}.{i}": sparse[:, i] for p in PREFIXES for i in range(f)})
        if self.training:  # for a regulariser on the looked-up rows (train_sharded's row_l2)
            self.last_rows, self.last_ids = rows, sparse
        emb = torch.stack([rows[f"embeddings.{i}"] for i in range(f)], dim=1)
        first = torch.cat([rows[f"linear_embeddings.{i}"] for i in range(f)], 1).sum(1)
        return deepfm_head(self, emb, first, dense)


def shard_deepfm(model: DeepFM, plan: ShardingPlan, group=None) -> ShardedDeepFM:
    """A copy of ``model`` whose tables are split over the ranks of ``group`` as ``plan`` says.

    Call it on every rank with the same model weights; each rank keeps only its own rows."""
    from ..models.compact_embedding import CompactEmbedding

    if not isinstance(model, DeepFM):
        raise UsageError(f"shard_deepfm needs a DeepFM, got {type(model).__name__}.",
                         "For other models, use ShardedEmbeddingCollection directly.")
    id_maps = {}
    for i, (emb, lin) in enumerate(zip(model.embeddings, model.linear_embeddings)):
        kinds = (isinstance(emb, CompactEmbedding), isinstance(lin, CompactEmbedding))
        if any(kinds) and not (all(kinds) and lin.mapping() is emb.mapping()):
            raise UsageError(f"Field {i}: only one of its two tables is row-pruned (or they use different "
                             "id maps); the sharded model maps a field's ids once for both tables.",
                             "Row-prune both tables of the field with embedding_row_prune.")
        if kinds[0]:
            id_maps[i] = emb.mapping()
        elif not isinstance(emb, nn.Embedding) or not isinstance(lin, nn.Embedding):
            raise UsageError(f"Field {i}: table type {type(emb).__name__} cannot be sharded.",
                             "Shard the float model, then quantize the shards (model.tables.quantize_).")
    weights = {n: model.get_submodule(n).weight for n in deepfm_tables(model)}
    return ShardedDeepFM(deepfm_config(model), plan, model, group=group, weights=weights, id_maps=id_maps)
