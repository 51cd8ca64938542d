"""Training and evaluation of a DeepFM whose tables are sharded over the ranks of a process group.

Data-parallel on the replicated layers (MLP, dense layer, bias), model-parallel on the tables:

* every step takes one *global* batch, the same on every rank (a seeded shuffle that does not
  depend on the number of ranks); rank r keeps rows r, r + world, r + 2 * world, ... of it;
* each rank's loss is the sum over its rows times ``world / len(global batch)``, so after
  ``sync_grads`` (which divides by the world size) every gradient is the gradient of the mean
  loss over the global batch, whatever the number of ranks;
* the replicated layers use AdamW, the table shards use :class:`RowWiseAdagrad`, which only
  touches the rows looked up in the step.

With the same seed and global batch size, 1 process and N processes therefore take the same
steps from the same start (the tables are initialised by row blocks, independently of the
plan); only the order of floating-point sums differs.
"""
from __future__ import annotations

import hashlib
import math
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..errors import SlimcartError, UsageError
from ..optim import RowWiseAdagrad  # noqa: F401  (re-exported: the tables' optimizer)
from ..models.deepfm import DeepFM, DeepFMConfig
from .checkpoint import LAST, load_sharded, load_training_state, save_sharded, save_training_state
from .deepfm import PREFIXES, ShardedDeepFM
from .grads import sync_grads
from .plan import ShardingPlan
from .sharded import ShardedEmbeddingCollection

INIT_BLOCK_ROWS = 4096  # the tables are initialised in blocks of rows, each from its own seed
EMBED_INIT_STD = 0.01  # as DeepFM: embeddings ~ N(0, 0.01), first-order (linear) tables at 0


class PeerFailure(SlimcartError):
    """A collective failed: another rank died, or did not answer within the group's timeout."""

    exit_code = 1


_COMM_MARKERS = ("gloo", "nccl", "connection", "timed out", "timeout", "peer", "socket",
                 "broken pipe", "processgroup")


def peer_failure(exc: BaseException, rank: int, timeout_s: float | None = None) -> PeerFailure | None:
    """A :class:`PeerFailure` with a readable message if ``exc`` looks like a failed collective
    (gloo and nccl raise plain RuntimeErrors), else None."""
    if isinstance(exc, PeerFailure):
        return exc
    dist_error = getattr(dist, "DistError", ())
    text = str(exc)
    if not (isinstance(exc, dist_error) or (isinstance(exc, RuntimeError)
                                            and any(m in text.lower() for m in _COMM_MARKERS))):
        return None
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    limit = f" within the {timeout_s:g} s timeout" if timeout_s else ""
    return PeerFailure(
        f"rank {rank}: a collective operation failed; another rank exited or did not answer{limit} "
        f"({first[:300]}).",
        "Look at the other ranks' output for the first error (torchrun names the rank that "
        "failed first); raise --timeout-s if a rank is just slow.")


# ---- building -----------------------------------------------------------------------------------

def config_tables(cfg: DeepFMConfig, dtype: torch.dtype = torch.float32) -> dict[str, tuple[int, int, int]]:
    """The tables of a DeepFM with config ``cfg`` as ``deepfm_tables`` lists them, without building
    the model (name -> (rows, dim, bytes per row))."""
    size = torch.empty(0, dtype=dtype).element_size()
    return {f"{prefix}.{i}": (rows, dim, dim * size)
            for prefix, dim in zip(PREFIXES, (cfg.embed_dim, 1)) for i, rows in enumerate(cfg.vocab_sizes)}


def _block_seed(seed: int, table: str, block: int) -> int:
    digest = hashlib.blake2b(f"{seed}/{table}/{block}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def init_rows(table: str, start: int, end: int, dim: int, seed: int,
              std: float = EMBED_INIT_STD) -> torch.Tensor:
    """Rows ``start:end`` of table ``table`` at initialisation, the same whichever rank makes them:
    each block of INIT_BLOCK_ROWS rows comes from its own seed; only the blocks that overlap the
    range are generated, so a rank never builds a whole table."""
    out = torch.empty(end - start, dim)
    if std == 0:
        return out.zero_()
    for block in range(start // INIT_BLOCK_ROWS, (end - 1) // INIT_BLOCK_ROWS + 1 if end > start else 0):
        lo = block * INIT_BLOCK_ROWS
        g = torch.Generator().manual_seed(_block_seed(seed, table, block))
        rows = torch.randn(INIT_BLOCK_ROWS, dim, generator=g) * std
        a, b = max(start, lo), min(end, lo + INIT_BLOCK_ROWS)
        out[a - start:b - start] = rows[a - lo:b - lo]
    return out


def build_sharded_deepfm(cfg: DeepFMConfig, plan: ShardingPlan, seed: int = 0, group=None,
                         device: torch.device | str | None = None) -> ShardedDeepFM:
    """A freshly initialised ShardedDeepFM that holds only this rank's rows.

    The replicated layers come from ``torch.manual_seed(seed)`` (the same on every rank); the
    table rows from :func:`init_rows`, so the model is the same for any plan and world size."""
    rank = dist.get_rank(group)
    torch.manual_seed(seed)
    stub = DeepFM(cfg.model_copy(update={"vocab_sizes": [1] * len(cfg.vocab_sizes)}))
    shards = {}
    for name, p in plan.tables.items():
        rows = p.local_rows(rank)
        if rows is not None:
            std = EMBED_INIT_STD if name.startswith(f"{PREFIXES[0]}.") else 0.0
            shards[name] = init_rows(name, *rows, p.dim, seed, std)
    model = ShardedDeepFM(cfg, plan, stub, group=group, shards=shards)
    return model.to(device) if device is not None else model


# ---- helpers that every rank calls in step ----------------------------------------------------------

def peak_rss_bytes() -> int:
    """This process's peak resident set size (ru_maxrss is in KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def _gather_ints(values: list[int], group, device) -> list[list[int]]:
    """Every rank's ``values`` (same length on every rank), on every rank."""
    world = dist.get_world_size(group)
    mine = torch.tensor(values, dtype=torch.int64, device=device)
    out = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(out, mine, group=group)
    return [t.tolist() for t in out]


def _to(inputs: tuple[torch.Tensor, ...], idx: torch.Tensor, device) -> tuple[torch.Tensor, ...]:
    return tuple(t[idx].to(device) for t in inputs)


@torch.no_grad()
def predict_sharded(model: ShardedDeepFM, inputs: tuple[torch.Tensor, ...], batch_size: int = 4096,
                    dst: int | None = 0) -> np.ndarray | None:
    """Logits of the sharded model for all rows of ``inputs`` (the same full inputs on every rank).

    Rank r scores the contiguous block ``r * n // world : (r + 1) * n // world`` in batches (every
    rank runs the same number of lookups, some possibly empty); the logits are gathered, in row
    order, on rank ``dst`` (None: on every rank). Returns None on the ranks that get nothing."""
    group = model.tables.group
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    device = model.bias.device
    n = int(inputs[0].shape[0])
    bounds = [r * n // world for r in range(world + 1)]
    lo, hi = bounds[rank], bounds[rank + 1]
    widest = max(b - a for a, b in zip(bounds, bounds[1:]))
    steps = max(1, math.ceil(widest / batch_size))
    was_training = model.training
    model.eval()
    parts = []
    for k in range(steps):
        a, b = min(lo + k * batch_size, hi), min(lo + (k + 1) * batch_size, hi)
        idx = torch.arange(a, b)
        parts.append(model(*_to(inputs, idx, device)).float())
    model.train(was_training)
    local = torch.cat(parts)
    padded = torch.zeros(widest, dtype=torch.float32, device=device)
    padded[:local.numel()] = local
    if dst is None:
        pieces = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(pieces, padded, group=group)
    else:
        pieces = [torch.empty_like(padded) for _ in range(world)] if rank == dst else None
        dist.gather(padded, pieces, group=group, group_dst=dst)
        if rank != dst:
            return None
    return torch.cat([p[:b - a] for p, a, b in zip(pieces, bounds, bounds[1:])]).cpu().numpy()


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (ties count one half), NaN when the labels hold one class only.
    Plain numpy, the same value as sklearn's roc_auc_score, without importing sklearn."""
    labels, scores = np.asarray(labels).reshape(-1) > 0.5, np.asarray(scores, dtype=np.float64).reshape(-1)
    n, n_pos = labels.size, int(labels.sum())
    if n_pos == 0 or n_pos == n:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    ordered = scores[order]
    starts = np.r_[0, np.flatnonzero(np.diff(ordered)) + 1]
    ends = np.r_[starts[1:], n]
    ranks = np.empty(n, dtype=np.float64)
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)  # average 1-based rank of ties
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * (n - n_pos)))


def ctr_metrics(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """AUC and log loss of click logits (AUC is NaN when the labels hold one class only)."""
    labels = np.asarray(labels, dtype=np.float64)
    prob = np.clip(1.0 / (1.0 + np.exp(-np.asarray(logits, dtype=np.float64))), 1e-7, 1 - 1e-7)
    logloss = -np.mean(labels * np.log(prob) + (1 - labels) * np.log(1 - prob))
    return {"auc": roc_auc(labels, logits), "logloss": float(logloss)}


def evaluate_sharded(model: ShardedDeepFM, inputs: tuple[torch.Tensor, ...], labels: torch.Tensor,
                     batch_size: int = 4096, metrics: Callable | None = None) -> dict[str, float]:
    """Metrics of the sharded model on a split, computed on rank 0 and broadcast, so every rank
    returns the same numbers. ``metrics(logits, labels)`` defaults to :func:`ctr_metrics`."""
    group = model.tables.group
    logits = predict_sharded(model, inputs, batch_size, dst=0)
    names = ("auc", "logloss")
    values = torch.full((len(names),), float("nan"), dtype=torch.float64, device=model.bias.device)
    if logits is not None:
        got = (metrics or ctr_metrics)(logits, labels.cpu().numpy())
        values = torch.tensor([float(got.get(k, float("nan"))) for k in names],
                              dtype=torch.float64, device=values.device)
    dist.broadcast(values, group=group, group_src=0)
    return dict(zip(names, values.cpu().tolist()))


# ---- training -------------------------------------------------------------------------------------

def _inverse_counts(sparse: torch.Tensor, vocab_sizes: list[int], device) -> list[torch.Tensor]:
    """1 / (count of each id in the train split) per field (1 for ids that never occur)."""
    from ..tasks.ctr_reg import inverse_counts

    return [inverse_counts(sparse[:, i], v).to(device) for i, v in enumerate(vocab_sizes)]


def _row_penalty(rows: dict[str, torch.Tensor], sparse: torch.Tensor, inv: list[torch.Tensor]) -> torch.Tensor:
    """Sum over this rank's rows of sum_tables ||row||^2 / count(row) (both tables of a field)."""
    total = sparse.new_zeros((), dtype=torch.float32)
    for name, e in rows.items():
        field = int(name.rsplit(".", 1)[1])
        total = total + (e.pow(2).sum(1) * inv[field][sparse[:, field]]).sum()
    return total


@dataclass
class TrainResult:
    """What :func:`train_sharded` did. ``epochs`` holds one dict per epoch, the same on every rank
    except eval_seconds: train_loss (mean log loss over all train rows, without the row penalty),
    val_auc, val_logloss, seconds (the training part, slowest rank), eval_seconds (this rank),
    samples_per_s (global rows / seconds), steps, peak_rss_bytes, table_bytes and
    optimizer_state_bytes (one entry per rank), improved."""

    model: ShardedDeepFM
    epochs: list[dict[str, Any]] = field(default_factory=list)
    best_epoch: int = 0
    best_val_auc: float = float("nan")
    stopped_early: bool = False
    checkpoint: str | None = None
    ranks: list[dict[str, int]] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {"epochs": self.epochs, "best_epoch": self.best_epoch, "best_val_auc": self.best_val_auc,
                "stopped_early": self.stopped_early, "checkpoint": self.checkpoint, "ranks": self.ranks}


def train_sharded(model: ShardedDeepFM, train: tuple[tuple[torch.Tensor, ...], torch.Tensor],
                  val: tuple[tuple[torch.Tensor, ...], torch.Tensor], *, epochs: int = 2,
                  batch_size: int = 1024, lr: float = 2e-3, table_lr: float = 0.05,
                  weight_decay: float = 0.0, row_l2: float = 0.0, patience: int = 1, seed: int = 0,
                  checkpoint_dir: str | Path | None = None, eval_batch_size: int = 4096,
                  metrics: Callable | None = None, max_steps: int | None = None,
                  log: Callable[[str], None] | None = print, resume: bool = False) -> TrainResult:
    """Train ``model`` on every rank of its process group; call it on every rank with the same
    arguments (the full train and val splits as ``(inputs, labels)``; each rank reads its slice).

    ``batch_size`` is the global batch (split over the ranks). After each epoch the val AUC is
    computed on rank 0 and broadcast with the decision to stop: training stops after ``patience``
    epochs without a better AUC. With ``checkpoint_dir``, the model is saved there with
    ``save_sharded`` (one file per rank + plan + config) at every better epoch, and at the end the
    model is put back to that best epoch; without it, the last epoch's weights are kept.
    ``log`` gets one line per epoch on rank 0 (None: silent). ``max_steps`` caps the steps per epoch.

    With ``checkpoint_dir``, every epoch also saves the training state (weights, the tables'
    Adagrad accumulators, AdamW's moments, the counters) to ``checkpoint_dir/last``;
    ``resume=True`` continues from it, on any number of ranks (rows and accumulators are re-split),
    from the epoch after the saved one. Each epoch seeds torch from (seed, epoch, rank), so on the
    same number of ranks a resumed run repeats the uninterrupted one exactly.

    ``row_l2`` adds the frequency-aware L2 of ``slimcart.tasks.ctr_reg`` on the looked-up rows:
    each lookup of row i adds row_l2 * ||w_i||^2 / count_i (count_i: the id's count in the train
    split, which every rank holds), so every row gets the same prior whatever its frequency.
    """
    for name, value, low in (("epochs", epochs, 1), ("batch_size", batch_size, 1),
                             ("patience", patience, 1), ("eval_batch_size", eval_batch_size, 1)):
        if not isinstance(value, int) or value < low:
            raise UsageError(f"{name} must be a whole number >= {low}, got {value!r}.")
    if not (lr > 0 and table_lr > 0 and weight_decay >= 0 and row_l2 >= 0):
        raise UsageError(f"Learning rates must be > 0, weight decay and row_l2 >= 0; got lr={lr}, "
                         f"table_lr={table_lr}, weight_decay={weight_decay}, row_l2={row_l2}.")
    (x_train, y_train), (_, y_val) = train, val
    n = int(y_train.shape[0])
    if n == 0 or int(y_val.shape[0]) == 0:
        raise UsageError(f"Training needs rows in both splits; got {n} train and {int(y_val.shape[0])} "
                         "val rows.", "Use a larger dataset.")
    group = model.tables.group
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    device = model.bias.device
    tables = {id(p) for m in model.modules() if isinstance(m, ShardedEmbeddingCollection) for p in m.parameters()}
    table_params = [p for p in model.parameters() if id(p) in tables]
    dense_params = [p for p in model.parameters() if id(p) not in tables]
    dense_opt = torch.optim.AdamW(dense_params, lr=lr, weight_decay=weight_decay)
    table_opt = RowWiseAdagrad(table_params, lr=table_lr)
    table_bytes = model.tables.local_bytes()
    steps = math.ceil(n / batch_size) if max_steps is None else min(max_steps, math.ceil(n / batch_size))
    inv_counts = (_inverse_counts(model.map_ids(x_train[0]), model.config.vocab_sizes, device)
                  if row_l2 > 0 else None)
    result = TrainResult(model=model, checkpoint=str(checkpoint_dir) if checkpoint_dir else None)
    best, waited, first = -math.inf, 0, 1
    if resume:
        if checkpoint_dir is None:
            raise UsageError("resume=True needs the checkpoint_dir the interrupted run saved to.")
        saved = load_training_state(Path(checkpoint_dir) / LAST, model, table_opt, dense_opt)
        changed = {k: (saved.get(k), v) for k, v in (("batch_size", batch_size), ("seed", seed))
                   if saved.get(k) != v}
        if changed:
            raise UsageError(f"The run in {checkpoint_dir} was started with other settings: "
                             + ", ".join(f"{k} {a} (now {b})" for k, (a, b) in changed.items()) + ".",
                             "Resume with the settings it was started with.")
        best, waited, first = saved["best"], saved["waited"], saved["epoch"] + 1
        result.best_epoch, result.best_val_auc = saved["best_epoch"], saved["best_val_auc"]
        result.epochs = list(saved["epochs"])
        if saved.get("stopped"):
            first = epochs + 1
            result.stopped_early = True
        if log is not None and rank == 0:
            log(f"resuming after epoch {saved['epoch']} (saved from {saved['world_size']} rank(s), now {world})")
    for epoch in range(first, epochs + 1):
        torch.manual_seed(seed * 1_000_003 + 7919 * epoch + rank)  # dropout: the same on a resumed run
        model.train()
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        seen = 0
        start = time.perf_counter()
        for step in range(steps):
            batch = order[step * batch_size:(step + 1) * batch_size]
            mine = batch[rank::world]
            inputs, labels = _to(x_train, mine, device), y_train[mine].to(device)
            out = model(*inputs)
            bce = F.binary_cross_entropy_with_logits(out, labels, reduction="sum")
            loss = bce
            if inv_counts is not None:
                loss = bce + row_l2 * _row_penalty(model.last_rows, model.last_ids, inv_counts)
            dense_opt.zero_grad(set_to_none=True)
            table_opt.zero_grad(set_to_none=True)
            (loss * (world / len(batch))).backward()
            sync_grads(model, group)
            dense_opt.step()
            table_opt.step()
            loss_sum += bce.detach().double()  # the log loss alone (without the row penalty)
            seen += len(batch)
        dist.all_reduce(loss_sum, group=group)
        took = torch.tensor([time.perf_counter() - start], dtype=torch.float64, device=device)
        dist.all_reduce(took, op=dist.ReduceOp.MAX, group=group)  # the slowest rank's time
        seconds = float(took)
        t_eval = time.perf_counter()
        got = evaluate_sharded(model, *val, batch_size=eval_batch_size, metrics=metrics)
        eval_seconds = time.perf_counter() - t_eval
        # Rank 0 decides (from the broadcast AUC) and broadcasts the decision, so all ranks agree.
        decision = torch.zeros(2, dtype=torch.int64, device=device)
        if rank == 0:
            improved = epoch == 1 or got["auc"] > best
            waited = 0 if improved else waited + 1
            decision = torch.tensor([int(improved), int(waited >= patience)], device=device)
        dist.broadcast(decision, group=group, group_src=0)
        improved, stop = bool(decision[0]), bool(decision[1])
        if improved:
            best, result.best_epoch, result.best_val_auc = got["auc"], epoch, got["auc"]
            if checkpoint_dir is not None:
                save_sharded(model, checkpoint_dir)
        per_rank = _gather_ints([peak_rss_bytes(), table_bytes, table_opt.state_bytes()], group, device)
        row = {"epoch": epoch, "train_loss": float(loss_sum) / seen, "val_auc": got["auc"],
               "val_logloss": got["logloss"], "seconds": seconds, "eval_seconds": eval_seconds,
               "samples_per_s": seen / seconds if seconds > 0 else float("inf"), "steps": steps,
               "peak_rss_bytes": [r[0] for r in per_rank], "table_bytes": [r[1] for r in per_rank],
               "optimizer_state_bytes": [r[2] for r in per_rank], "improved": improved}
        result.epochs.append(row)
        result.ranks = [{"rank": r, "peak_rss_bytes": v[0], "table_bytes": v[1], "optimizer_state_bytes": v[2]}
                        for r, v in enumerate(per_rank)]
        if checkpoint_dir is not None:
            save_training_state(model, table_opt, dense_opt, Path(checkpoint_dir) / LAST, {
                "epoch": epoch, "best": best, "waited": waited, "best_epoch": result.best_epoch,
                "best_val_auc": result.best_val_auc, "epochs": result.epochs, "batch_size": batch_size,
                "seed": seed, "stopped": stop and epoch < epochs})
        if log is not None and rank == 0:
            log(f"epoch {epoch}: train loss {row['train_loss']:.4f}  val AUC {row['val_auc']:.4f}  "
                f"{seconds:.1f} s  {row['samples_per_s']:.0f} samples/s  peak RSS "
                f"{max(row['peak_rss_bytes']) / 2**20:.0f} MiB (largest rank)  table bytes/rank "
                f"{row['table_bytes']}" + ("" if improved else "  (no better)"))
        if stop and epoch < epochs:
            result.stopped_early = True
            if log is not None and rank == 0:
                log(f"stopping early: no better val AUC for {patience} epoch(s); best was epoch "
                    f"{result.best_epoch} ({result.best_val_auc:.4f})")
            break
    if checkpoint_dir is not None and result.best_epoch != result.epochs[-1]["epoch"]:
        best_model = load_sharded(checkpoint_dir, model.tables.plan, group=group, cfg=model.config)
        model.load_state_dict(best_model.to(device).state_dict())
    return result
