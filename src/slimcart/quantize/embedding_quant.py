"""Row-wise quantized embedding tables (INT8 / INT4 / 2-bit, hottest rows wider).

Each selected ``nn.Embedding`` / ``CompactEmbedding`` becomes a ``QuantEmbedding`` (see
models/quant_embedding.py): packed codes plus a scale and bias per row (``scale_dtype``
float32 / float16), or an 8-bit index into 255 log-spaced scales per row (``log8``: symmetric
codes, 1 byte a row). 1-wide tables (DeepFM's first-order weights) get one scale and bias for
the whole table. ``search: mse`` picks, per row, the clipping range of least squared error
among a few candidates; ``minmax`` uses the row's range.

Mixed precision: with ``hot_fraction`` f, the round(f * rows) rows read most often on the
training split (counted by running the model over it: for DeepFM these are the training ids'
frequencies per field) are kept at ``hot_bits`` (8, 4, or 32: float). Rows never read are never
hot. The model stays a PyTorch module; the spec records what rebuilds it, so a saved variant
loads strictly, and ``onnx_export`` writes the packed tables into the graph.
"""
from __future__ import annotations

import fnmatch
import math
import re
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from ..errors import UsageError
from ..models.compact_embedding import CompactEmbedding
from ..models.quant_embedding import QuantEmbedding, replace_table, table_source
from ..registry import TORCH, TechniqueConfig, register
from ..stage import ModelState, StageContext, StageReport


class EmbeddingQuantConfig(TechniqueConfig):
    bits: Literal[8, 4, 2] = 4
    scale_dtype: Literal["float32", "float16", "log8"] = "float16"
    search: Literal["minmax", "mse"] = "mse"
    hot_fraction: float = Field(default=0.0, ge=0.0, le=0.5)
    hot_bits: Literal[8, 4, 32] = 8
    tables: list[str] | None = None           # fnmatch patterns of module names; None: every table
    min_rows: int = Field(default=1, ge=1)    # tables with fewer rows stay float

    def model_post_init(self, _ctx) -> None:
        if self.hot_fraction > 0 and self.hot_bits <= self.bits:
            raise ValueError(f"hot_bits ({self.hot_bits}) must be wider than bits ({self.bits})")
        if self.tables is not None and not self.tables:
            raise ValueError("tables is empty; leave it out to quantize every embedding table")


def quantize_table(mod: nn.Module, **kwargs) -> QuantEmbedding:
    """``mod`` (nn.Embedding / CompactEmbedding) as a QuantEmbedding (``from_float`` keywords);
    a row-pruned table keeps its id map."""
    weight, keys = table_source(mod)
    new = QuantEmbedding.from_float(weight, **kwargs, **keys)
    if keys.get("num_ids") is not None and keys["map_from"] is None:
        new.id_map.copy_(mod.id_map)
    return new


def embedding_bytes(model: nn.Module) -> int:
    """Bytes of every embedding table of the model (float, row-pruned or quantized; id maps included)."""
    kinds = (nn.Embedding, CompactEmbedding, QuantEmbedding)
    return sum(sum(t.numel() * t.element_size() for t in m.state_dict().values())
               for m in model.modules() if isinstance(m, kinds))


def _label(name: str, ctx: StageContext) -> str:
    names = (getattr(ctx.task, "info", None) or {}).get("categorical") or []
    m = re.fullmatch(r"(?:linear_)?embeddings\.(\d+)", name)
    return f"{name} ({names[int(m.group(1))]})" if m and int(m.group(1)) < len(names) else name


def _size(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} KB"


class _AllSeen(Exception):
    pass


def row_counts(model: nn.Module, names: list[str], ctx: StageContext) -> dict[str, torch.Tensor]:
    """How often each row of the tables ``names`` is read on the training split (a row-pruned
    table counts its compact rows). The forward stops once every table has been read."""
    task = ctx.task
    if task is None or "train" not in getattr(task, "splits", {}):
        raise UsageError("embedding_quant.hot_fraction needs the task's training split to find the "
                         "most frequent ids; this task has none.", "Set hot_fraction: 0.")
    mods = {n: model.get_submodule(n) for n in names}
    counts = {n: torch.zeros(table_source(m)[0].shape[0], dtype=torch.int64) for n, m in mods.items()}
    seen: set[str] = set()

    def hook(name: str):
        def count(mod, args):
            ids = args[0].reshape(-1).long()
            if isinstance(mod, CompactEmbedding):
                ids = mod.mapping()[ids].long()
            counts[name] += torch.bincount(ids, minlength=len(counts[name]))
            seen.add(name)
            if len(seen) == len(mods):
                raise _AllSeen
        return count

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in mods.items()]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for x, _ in task.batches("train", 2048):
                seen.clear()
                try:
                    model(*x)
                except _AllSeen:
                    pass
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return counts


def hot_rows(counts: torch.Tensor, fraction: float, limit: int | None = None) -> torch.Tensor:
    """The round(fraction * rows) most read rows (ties: lower row; at most ``limit``), never an
    unread one."""
    k = min(int(round(fraction * len(counts))), int((counts > 0).sum()),
            len(counts) if limit is None else limit)
    order = torch.sort(-counts, stable=True).indices
    return torch.sort(order[:k]).values


def sqnr_db(ref: torch.Tensor, approx: torch.Tensor) -> float | None:
    """Signal to quantization-noise ratio in dB; None when undefined (all-zero or exact table)."""
    signal = float(ref.double().pow(2).sum())
    noise = float((ref.double() - approx.double()).pow(2).sum())
    return 10 * math.log10(signal / noise) if signal > 0 and noise > 0 else None


@register("embedding_quant", EmbeddingQuantConfig, accepts=(TORCH,),
          summary="row-wise INT8/INT4/2-bit embedding tables (packed codes, per-row scales), hottest rows wider")
def embedding_quant(state: ModelState, cfg: EmbeddingQuantConfig, ctx: StageContext) -> StageReport:
    report = StageReport("embedding_quant", cfg.model_dump())
    model = state.torch_model
    tables = [n for n, m in model.named_modules()
              if isinstance(m, (nn.Embedding, CompactEmbedding, QuantEmbedding))]
    if not tables:
        raise UsageError(f"embedding_quant: {type(model).__name__} has no embedding table "
                         "(nn.Embedding or a row-pruned CompactEmbedding).")
    for pat in cfg.tables or []:
        if not any(fnmatch.fnmatchcase(n, pat) for n in tables):
            raise UsageError(f"embedding_quant.tables: pattern {pat!r} matches no embedding table.",
                             f"Embedding tables of this model: {', '.join(tables[:20])}"
                             + (", ..." if len(tables) > 20 else "") + ".")
    bytes_before = embedding_bytes(model)
    chosen = []
    for name in tables:
        mod, key = model.get_submodule(name), _label(name, ctx)
        if cfg.tables is not None and not any(fnmatch.fnmatchcase(name, p) for p in cfg.tables):
            report.skipped[key] = "not matched by tables"
        elif isinstance(mod, QuantEmbedding):
            report.skipped[key] = "already quantized"
        elif table_source(mod)[0].shape[0] < cfg.min_rows:
            report.skipped[key] = f"{table_source(mod)[0].shape[0]} rows < min_rows {cfg.min_rows}"
        elif isinstance(mod, nn.Embedding) and (mod.max_norm is not None or mod.sparse):
            report.skipped[key] = "max_norm / sparse tables are left in float"
        else:
            chosen.append(name)
    counts = row_counts(model, chosen, ctx) if cfg.hot_fraction > 0 and chosen else {}
    record = [dict(e) for e in state.spec.get("embedding_quant", {}).get("tables", [])]
    sqnr: dict[str, float | None] = {}
    hot_total = 0
    for name in chosen:
        old = model.get_submodule(name)
        weight = table_source(old)[0].detach()
        cap = QuantEmbedding.hot_capacity(*weight.shape, cfg.bits)
        hot = hot_rows(counts[name], cfg.hot_fraction, cap) if name in counts else None
        new = quantize_table(old, bits=cfg.bits, scale_dtype=cfg.scale_dtype, search=cfg.search,
                             hot_ids=hot, hot_bits=cfg.hot_bits)
        replace_table(model, name, new)
        record.append({"name": name, **new.record()})
        table = new.dequantize()
        sqnr[name] = sqnr_db(weight, table)
        hot_total += new.hot_rows
        params = f"scale+bias {cfg.scale_dtype}" if cfg.scale_dtype != "log8" else "log8 scale index"
        text = (f"{weight.shape[0]:,} x {weight.shape[1]} {str(weight.dtype).removeprefix('torch.')} -> "
                f"int{cfg.bits} rows ({params if new.per_row else 'one fp32 scale+bias for the table'}), "
                f"{_size(weight.numel() * weight.element_size())} -> {_size(new.nbytes())}, "
                + (f"SQNR {sqnr[name]:.1f} dB" if sqnr[name] is not None else
                   "exact" if torch.equal(weight.float(), table) else "SQNR n/a (all-zero table)"))
        if new.hot_rows:
            text += f", {new.hot_rows} hot rows at {'fp32' if cfg.hot_bits == 32 else f'int{cfg.hot_bits}'}"
        elif cfg.hot_fraction > 0:
            text += ", no hot rows" + (" (1-wide table)" if not new.per_row else "")
        if new.num_ids is not None:
            text += ", id map kept" + (" (shared)" if new._map_from is not None else "")
        report.changed[_label(name, ctx)] = text
    if record:
        state.spec = {**state.spec, "embedding_quant": {"tables": record}}
    bytes_after = embedding_bytes(model)
    report.stats = {"embedding_bytes_before": bytes_before, "embedding_bytes_after": bytes_after,
                    "ratio": bytes_before / bytes_after if bytes_after else None,
                    "tables_quantized": len(chosen), "hot_rows": hot_total,
                    "sqnr_db": {k: (round(v, 2) if v is not None else None) for k, v in sqnr.items()}}
    return report
