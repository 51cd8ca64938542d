"""Embedding tables sharded over the ranks of a process group. Each rank keeps only its own rows;
a lookup sends every id to the rank that owns its row (one all-to-all of ids), the owner reads
the rows, and they come back with a second, differentiable all-to-all, so training updates the
owning shard. Every rank passes its own batch (sizes may differ) and must take part in every
lookup, with the same tables in the same order."""
from __future__ import annotations

from typing import Mapping

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..errors import UsageError
from .comm import all_to_all, exchange
from .plan import ShardingPlan


def _key(name: str) -> str:
    return name.replace(".", "__")


class ShardedEmbeddingCollection(nn.Module):
    """This rank's shards of the tables ``tables`` (default: all of ``plan``'s, in its order).

    Give ``weights`` (full tables; only this rank's rows are copied), or ``shards`` (this rank's
    rows only, e.g. read from a checkpoint), or neither (zeros, to be filled in later)."""

    def __init__(self, plan: ShardingPlan, tables: list[str] | None = None, *,
                 weights: Mapping[str, torch.Tensor] | None = None,
                 shards: Mapping[str, torch.Tensor] | None = None, group=None,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None):
        super().__init__()
        plan.check_world_size(dist.get_world_size(group))
        self.plan, self.group, self.rank = plan, group, dist.get_rank(group)
        self.tables = list(plan.tables) if tables is None else list(tables)
        unknown = [t for t in self.tables if t not in plan.tables]
        if unknown or len(set(self.tables)) != len(self.tables):
            raise UsageError(f"Tables {self.tables} must be distinct names from the plan; "
                             f"not in it: {unknown}.", f"The plan has: {', '.join(plan.tables)}.")
        sources = [*(weights or {}).values(), *(shards or {}).values()]
        self.dtype = dtype or (sources[0].dtype if sources else torch.float32)
        self.shards = nn.ParameterDict()
        for name in self.tables:
            p, rows = plan.tables[name], plan.tables[name].local_rows(self.rank)
            if rows is None:
                continue
            start, end = rows
            full = shards is None or name not in shards
            w = (shards or {}).get(name, (weights or {}).get(name))
            if w is None:
                w, full = torch.zeros(end - start, p.dim, device=device), False
            want = (p.rows if full else end - start, p.dim)
            if tuple(w.shape) != want:
                raise UsageError(f"Table {name!r}: got a tensor of shape {tuple(w.shape)}, the plan "
                                 f"needs {want} on rank {self.rank}.",
                                 "Make the plan from the same model (deepfm_tables / plan_tables).")
            w = w[start:end] if full else w
            self.shards[_key(name)] = nn.Parameter(w.detach().to(device=device, dtype=self.dtype).clone())
        self.quantized = nn.ModuleDict()  # table -> QuantEmbedding of this rank's rows (quantize_)

    def local_shards(self) -> dict[str, nn.Parameter]:
        """Table name -> the float rows this rank holds (see ``plan.tables[name].local_rows``)."""
        if len(self.quantized):
            raise UsageError("The tables of this collection are quantized (quantize_): they serve lookups "
                             "but hold no float rows to train, gather or checkpoint.",
                             "Save or gather the model before quantizing it.")
        return {n: self.shards[_key(n)] for n in self.tables if _key(n) in self.shards}

    def local_bytes(self) -> int:
        return (sum(p.numel() * p.element_size() for p in self.shards.values())
                + sum(q.nbytes() for q in self.quantized.values()))

    def quantize_(self, bits: int = 4, scale_dtype: str = "float16", search: str = "mse",
                  tables: list[str] | None = None) -> dict[str, tuple[int, int]]:
        """Replace this rank's float rows of ``tables`` (default: all) by row-wise ``bits``-bit codes
        with a scale and bias per row (slimcart.models.quant_embedding), for sharded serving:
        each rank dequantizes the rows it is asked for and sends floats back. With float16 or float32
        scales every row is quantized on its own, so the rows equal those of the unsharded table
        quantized the same way; "log8" fits its scale grid to each shard's rows. Returns table ->
        (bytes before, bytes after) on this rank. Call on every rank; no gradients afterwards."""
        from ..models.quant_embedding import QuantEmbedding

        chosen = self.tables if tables is None else tables
        unknown = [t for t in chosen if t not in self.tables]
        if unknown:
            raise UsageError(f"quantize_: tables {unknown} are not in this collection.",
                             f"Its tables: {', '.join(self.tables)}.")
        done = {}
        for name in chosen:
            key = _key(name)
            if key not in self.shards:
                continue
            w = self.shards[key]
            try:
                q = QuantEmbedding.from_float(w.detach(), bits, scale_dtype, search=search)
            except ValueError as exc:
                raise UsageError(f"quantize_ table {name!r}: {exc}") from None
            done[name] = (w.numel() * w.element_size(), q.nbytes())
            self.quantized[key] = q.to(w.device)
            del self.shards[key]
        return done

    def forward(self, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """ids [B, len(tables)] (column i indexes table i) -> table name -> rows [B, dim]."""
        if ids.dim() != 2 or ids.shape[1] != len(self.tables):
            raise UsageError(f"Expected ids of shape [batch, {len(self.tables)}] (one column per "
                             f"table: {', '.join(self.tables)}), got {tuple(ids.shape)}.")
        return self.lookup({n: ids[:, i] for i, n in enumerate(self.tables)})

    def lookup(self, ids: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Table name -> ids of any shape; returns table name -> rows [*ids.shape, dim]."""
        names = list(ids)
        rows = self._route(names, [ids[n].reshape(-1).long() for n in names])
        return {n: r.reshape(*ids[n].shape, r.shape[-1]) for n, r in zip(names, rows)}

    def pooled(self, bags: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
               mode: str = "sum") -> dict[str, torch.Tensor]:
        """Multi-hot bags: table name -> (ids [N], offsets [num_bags]) as for nn.EmbeddingBag;
        returns table name -> the sum (or mean) of each bag's rows [num_bags, dim]."""
        if mode not in ("sum", "mean"):
            raise UsageError(f"Unknown pooling mode {mode!r}.", "Use 'sum' or 'mean'.")
        names, lengths = list(bags), {}
        for name in names:
            ids, offsets = bags[name][0].reshape(-1), bags[name][1].reshape(-1).long()
            lengths[name] = torch.cat([offsets[1:], offsets.new_tensor([ids.numel()])]) - offsets
            if offsets.numel() and (int(offsets[0]) != 0 or bool((lengths[name] < 0).any())):
                raise UsageError(f"Bag offsets for table {name!r} must start at 0, not decrease and "
                                 f"stay within its {ids.numel()} ids.",
                                 "Pass offsets as for nn.EmbeddingBag.")
        rows = self._route(names, [bags[n][0].reshape(-1).long() for n in names])
        out = {}
        for name, r in zip(names, rows):
            n_bags = lengths[name].numel()
            bag = torch.repeat_interleave(torch.arange(n_bags, device=r.device), lengths[name])
            pooled = r.new_zeros(n_bags, r.shape[1]).index_add(0, bag, r)
            div = lengths[name].clamp(min=1).unsqueeze(1).to(r.dtype)
            out[name] = pooled / div if mode == "mean" else pooled
        return out

    def _owners(self, name: str, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(owning rank, row within the owner's shard) of every id."""
        p, ids = self.plan.tables[name], ids.contiguous()
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= p.rows):
            raise UsageError(f"Ids for table {name!r} must be in [0, {p.rows}); got values from "
                             f"{int(ids.min())} to {int(ids.max())}.",
                             "Map unseen or out-of-range ids to a valid row before the lookup.")
        if p.kind == "table_wise":
            return torch.full_like(ids, p.ranks[0]), ids
        offsets = torch.tensor(p.offsets, device=ids.device)
        shard = torch.searchsorted(offsets[1:], ids, right=True)
        return torch.tensor(p.ranks, device=ids.device)[shard], ids - offsets[shard]

    def _route(self, names: list[str], ids: list[torch.Tensor]) -> list[torch.Tensor]:
        """Rows of ``ids[t]`` (1-D) from table ``names[t]``, wherever they live: [n_t, dim] each.

        Requests travel in blocks ordered by (owner, slot t); the counts of every block are
        exchanged first, so neither side has to send table indices."""
        world, slots = self.plan.world_size, len(names)
        unknown = [n for n in names if n not in self.tables]
        if unknown or slots == 0:
            raise UsageError(f"Lookup of tables {unknown or names}: need one or more of this "
                             f"collection's tables.", f"Its tables: {', '.join(self.tables)}.")
        device = ids[0].device
        owners = [self._owners(n, x) for n, x in zip(names, ids)]
        dest = torch.cat([d for d, _ in owners])
        slot = torch.repeat_interleave(torch.arange(slots, device=device),
                                       torch.tensor([x.numel() for x in ids], device=device))
        key = dest * slots + slot
        order = torch.argsort(key, stable=True)
        counts = torch.bincount(key, minlength=world * slots)
        counts_in = exchange(counts, [slots] * world, [slots] * world, self.group)
        sent, came = counts.view(world, slots), counts_in.view(world, slots)
        got = exchange(torch.cat([r for _, r in owners])[order], sent.sum(1).tolist(),
                       came.sum(1).tolist(), self.group)
        dims = torch.tensor([self.plan.tables[n].dim for n in names], device=device)
        values = self._serve(names, got, came.tolist())
        answers = all_to_all(values, (came * dims).sum(1).tolist(), (sent * dims).sum(1).tolist(),
                             self.group)
        blocks = answers.split((sent * dims).flatten().tolist())
        sent_l, out = sent.tolist(), []
        for t in range(slots):
            d = int(dims[t])
            by_owner = torch.cat([blocks[r * slots + t].view(sent_l[r][t], d) for r in range(world)])
            out.append(by_owner[torch.argsort(torch.argsort(owners[t][0], stable=True))])
        return out

    def _serve(self, names: list[str], got: torch.Tensor, came: list[list[int]]) -> torch.Tensor:
        """Read the requested rows, laid out flat in (source rank, slot) blocks."""
        world, slots = len(came), len(names)
        pieces = got.split([c for row in came for c in row])
        found = {}
        for t, name in enumerate(names):
            n = [came[s][t] for s in range(world)]
            if sum(n):
                rows = torch.cat([pieces[s * slots + t] for s in range(world)])
                if _key(name) in self.quantized:
                    found[t] = self.quantized[_key(name)].lookup(rows).to(self.dtype).split(n)
                    continue
                # sparse=True: the backward pass touches only the rows read, not the whole shard
                found[t] = F.embedding(rows, self.shards[_key(name)], sparse=True).split(n)
        flat = [found[t][s].reshape(-1) for s in range(world) for t in range(slots) if t in found]
        values = torch.cat(flat) if flat else torch.zeros(0, dtype=self.dtype, device=got.device)
        params = list(self.shards.values())
        if torch.is_grad_enabled() and not values.requires_grad and (
                not params or any(p.requires_grad for p in params)):
            # The backward all-to-all must run on every rank, including those that served nothing.
            values = values.detach().requires_grad_()
        return values
