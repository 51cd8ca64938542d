"""Sharding plans for embedding tables: each table lives whole on one rank (table-wise) or is split
into contiguous row ranges, one per rank (row-wise). ``plan_tables`` balances the bytes per rank."""
from __future__ import annotations

from pathlib import Path
from typing import Literal, Mapping, Sequence

import torch
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from ..errors import UsageError


class TablePlacement(BaseModel):
    """Where the rows of one table live: rows ``offsets[i]:offsets[i + 1]`` are on ``ranks[i]``."""

    model_config = ConfigDict(extra="forbid")
    rows: int
    dim: int
    bytes_per_row: int
    kind: Literal["table_wise", "row_wise"]
    ranks: list[int]
    offsets: list[int]
    shard_loads: list[float] | None = None  # share of the lookups each shard serves, if known

    def shards(self) -> list[tuple[int, int, int]]:
        """(rank, first row, end row) of every shard."""
        return [(r, self.offsets[i], self.offsets[i + 1]) for i, r in enumerate(self.ranks)]

    def local_rows(self, rank: int) -> tuple[int, int] | None:
        """The row range held by ``rank``, or None if it holds none of this table."""
        for r, start, end in self.shards():
            if r == rank:
                return start, end
        return None


class ShardingPlan(BaseModel):
    """Placement of every table over ``world_size`` ranks (tables in lookup order)."""

    model_config = ConfigDict(extra="forbid")
    world_size: int
    tables: dict[str, TablePlacement]

    @model_validator(mode="after")
    def _check(self) -> "ShardingPlan":
        if self.world_size < 1:
            raise UsageError(f"A sharding plan needs at least 1 rank, got world_size={self.world_size}.",
                             "Pass the number of processes in the group (1 or more).")
        for name, t in self.tables.items():
            if t.kind == "row_wise" and t.rows < self.world_size:
                raise _too_few_rows(name, t.rows, self.world_size, t.rows * t.bytes_per_row)
        for name, t in self.tables.items():
            want = 1 if t.kind == "table_wise" else self.world_size
            ok = (len(t.ranks) == want and len(set(t.ranks)) == want
                  and all(0 <= r < self.world_size for r in t.ranks)
                  and len(t.offsets) == want + 1 and t.offsets[0] == 0 and t.offsets[-1] == t.rows
                  and all(a < b for a, b in zip(t.offsets, t.offsets[1:])))
            if not ok:
                raise UsageError(
                    f"Table {name!r} has an invalid placement for {self.world_size} ranks "
                    f"(kind={t.kind}, ranks={t.ranks}, offsets={t.offsets}, rows={t.rows}).",
                    "Build plans with slimcart.parallel.plan_tables rather than by hand.")
        return self

    def check_world_size(self, world_size: int, where: str = "the process group") -> None:
        """Raise a UsageError unless the plan was made for ``world_size`` ranks."""
        if world_size != self.world_size:
            raise UsageError(
                f"The sharding plan is for {self.world_size} ranks but {where} has {world_size} ranks.",
                f"Make a plan for {world_size} ranks with plan_tables(..., world_size={world_size}), "
                f"or start {self.world_size} processes.")

    def rank_bytes(self) -> list[int]:
        """Bytes of table rows held by each rank."""
        out = [0] * self.world_size
        for t in self.tables.values():
            for r, start, end in t.shards():
                out[r] += (end - start) * t.bytes_per_row
        return out

    def rank_loads(self) -> list[float] | None:
        """Expected share of the lookups served by each rank (None when the plan has no loads)."""
        if not any(t.shard_loads for t in self.tables.values()):
            return None
        out = [0.0] * self.world_size
        for t in self.tables.values():
            for (r, _, _), load in zip(t.shards(), t.shard_loads or []):
                out[r] += load
        return out

    def describe(self) -> str:
        """A table of rank -> bytes (and lookup load) -> tables, to print before a run."""
        sizes, loads = self.rank_bytes(), self.rank_loads()
        total = sum(sizes)
        mean = total / self.world_size or 1
        lines = [f"Sharding plan: {len(self.tables)} tables over {self.world_size} rank(s), "
                 f"{_human(total)} of table rows",
                 f"{'rank':>4}  {'bytes':>10}  {'share':>6}" + (f"  {'load':>6}" if loads else "") + "  tables"]
        for r in range(self.world_size):
            names = []
            for name, t in self.tables.items():
                rows = t.local_rows(r)
                if rows is not None:
                    names.append(name if t.kind == "table_wise" else f"{name}[{rows[0]}:{rows[1]}]")
            share = sizes[r] / total if total else 0.0
            load = f"  {loads[r]:>6.1%}" if loads else ""
            lines.append(f"{r:>4}  {_human(sizes[r]):>10}  {share:>6.1%}{load}  {', '.join(names) or '-'}")
        lines.append(f"the largest rank holds {max(sizes) / mean:.2f}x the mean bytes")
        return "\n".join(lines)

    def to_json(self, path: str | Path | None = None) -> str:
        """The plan as JSON; also written to ``path`` when given."""
        text = self.model_dump_json(indent=2)
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_json(cls, source: str | Path) -> "ShardingPlan":
        """A plan from a JSON string or from a file that holds one."""
        text = str(source)
        if isinstance(source, Path) or not text.lstrip().startswith("{"):
            if not Path(text).is_file():
                raise UsageError(f"Sharding plan file {text} does not exist.",
                                 "Save the plan with plan.to_json(path) next to the checkpoint.")
            text = Path(text).read_text()
        try:
            return cls.model_validate_json(text)
        except ValidationError as exc:
            raise UsageError(f"Not a valid sharding plan: {exc.error_count()} problem(s): "
                             f"{exc.errors()[0]['msg']} at {exc.errors()[0]['loc']}.",
                             "Save plans with plan.to_json() and load them with ShardingPlan.from_json().")


def plan_tables(tables: Mapping[str, tuple[int, int, int]], world_size: int,
                row_wise_threshold_bytes: int | None = None,
                loads: Mapping[str, Sequence[float] | torch.Tensor] | None = None) -> ShardingPlan:
    """Place ``tables`` (name -> (rows, dim, bytes per row)) over ``world_size`` ranks.

    Tables of at least ``row_wise_threshold_bytes`` are split row-wise over all ranks; by default,
    tables larger than a fair share (total bytes / world size) are, when they have enough rows.
    The rest are packed whole, largest first, onto the rank with the fewest bytes. With ``loads``
    (name -> read frequency of each row), the packing also balances the lookups per rank, and a
    row-wise split gives each rank the same average of its share of the rows and its share of
    the lookups: hot rows are spread out, and no rank gets over twice its fair share of either
    (give or take a row)."""
    if world_size < 1:
        raise UsageError(f"world_size must be at least 1, got {world_size}.",
                         "Pass the number of processes that will hold the tables.")
    loads = dict(loads or {})
    for name, (rows, dim, bpr) in tables.items():
        if rows < 1 or dim < 1 or bpr < 1:
            raise UsageError(f"Table {name!r} has rows={rows}, dim={dim}, bytes_per_row={bpr}.",
                             "Each table needs at least one row, one column and one byte per row.")
    for name, load in loads.items():
        if name not in tables:
            raise UsageError(f"loads names table {name!r}, which is not among the tables.",
                             f"Tables: {', '.join(tables)}.")
        if len(load) != tables[name][0]:
            raise UsageError(f"loads[{name!r}] has {len(load)} entries but the table has "
                             f"{tables[name][0]} rows.", "Give one read frequency per row.")
    row_load = {n: torch.as_tensor(v, dtype=torch.float64) for n, v in loads.items()}
    total_load = sum(float(v.sum()) for v in row_load.values())
    share = {n: (v / total_load if total_load > 0 else v * 0) for n, v in row_load.items()}
    total = sum(r * b for r, _, b in tables.values())
    placed: dict[str, TablePlacement] = {}
    rank_bytes, rank_load = [0.0] * world_size, [0.0] * world_size
    whole = []
    for name, (rows, dim, bpr) in tables.items():
        size = rows * bpr
        if row_wise_threshold_bytes is None:
            split = world_size > 1 and size > total / world_size and rows >= world_size
        else:
            split = size >= row_wise_threshold_bytes
            if split and rows < world_size:
                raise _too_few_rows(name, rows, world_size, size)
        if not split:
            whole.append(name)
            continue
        offsets = _split_rows(rows, world_size, share.get(name))
        shard_loads = _segment_sums(share[name], offsets) if name in share else None
        placed[name] = TablePlacement(rows=rows, dim=dim, bytes_per_row=bpr, kind="row_wise",
                                      ranks=list(range(world_size)), offsets=offsets,
                                      shard_loads=shard_loads)
        for r in range(world_size):
            rank_bytes[r] += (offsets[r + 1] - offsets[r]) * bpr
            rank_load[r] += shard_loads[r] if shard_loads else 0.0
    mean_bytes, mean_load = max(total / world_size, 1), 1 / world_size
    for name in sorted(whole, key=lambda n: (-tables[n][0] * tables[n][2], n)):
        rows, dim, bpr = tables[name]
        size, load = rows * bpr, float(share[name].sum()) if name in share else 0.0

        def cost(r: int) -> tuple[float, float]:
            b = (rank_bytes[r] + size) / mean_bytes
            return (max(b, (rank_load[r] + load) / mean_load) if loads else b), rank_bytes[r]

        r = min(range(world_size), key=cost)
        rank_bytes[r] += size
        rank_load[r] += load
        placed[name] = TablePlacement(rows=rows, dim=dim, bytes_per_row=bpr, kind="table_wise",
                                      ranks=[r], offsets=[0, rows],
                                      shard_loads=[load] if name in share else None)
    return ShardingPlan(world_size=world_size, tables={n: placed[n] for n in tables})


def _split_rows(rows: int, world: int, share: torch.Tensor | None) -> list[int]:
    """Boundaries of ``world`` non-empty row ranges: equal rows, or equal (rows + load) / 2."""
    if share is None or float(share.sum()) <= 0:
        return [r * rows // world for r in range(world + 1)]
    weight = torch.cumsum(0.5 / rows + 0.5 * share / share.sum(), 0)
    cuts = torch.searchsorted(weight, torch.arange(1, world, dtype=torch.float64) / world) + 1
    offsets = [0]
    for k, cut in enumerate(cuts.tolist(), start=1):
        offsets.append(min(max(cut, offsets[-1] + 1), rows - (world - k)))
    return offsets + [rows]


def _segment_sums(share: torch.Tensor, offsets: list[int]) -> list[float]:
    return [float(share[a:b].sum()) for a, b in zip(offsets, offsets[1:])]


def _too_few_rows(name: str, rows: int, world: int, size: int) -> UsageError:
    return UsageError(
        f"Table {name!r} has {rows} rows, fewer than the {world} ranks, so it cannot be split "
        f"row-wise (every rank needs at least one row).",
        f"Place it whole on one rank (raise row_wise_threshold_bytes above its {size} bytes) "
        f"or use at most {rows} ranks.")


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
