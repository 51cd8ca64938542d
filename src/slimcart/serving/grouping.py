"""Length groups for micro-batched text: a batch padded to its longest text does work for every
pad token, and with short and long texts together that is most of the batch (banking77: texts
of ~14 tokens padded to ~55 in a batch of 32). So a collected batch is split, by length, into the
groups that minimise the modelled time: each model call costs ``overhead + per_token * rows *
padded_length``. The two constants are measured on the served runner when the server starts
(two shapes, the fastest of a few calls), so the split follows this machine and runtime: where a call's
fixed cost dominates (eager PyTorch at batch 1) groups stay large, where compute dominates they
follow the lengths. One group is one model call; answers are unchanged (padding is masked).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch


@dataclass(frozen=True)
class CallCost:
    overhead_s: float      # fixed cost of one model call
    per_token_s: float     # cost of one (row x padded position)

    def of(self, rows: int, length: int) -> float:
        return self.overhead_s + self.per_token_s * rows * length


def measure_cost(run: Callable, ids: torch.Tensor, mask: torch.Tensor, *, short: int = 16,
                 long: int = 64, rows: int = 16, repeats: int = 5) -> CallCost:
    """Fit ``CallCost`` from the fastest time of ``run`` on (1 x short) and (rows x long) batches
    made from one real encoded row (its tokens tiled; the mask all ones)."""
    row = ids[:1][mask[:1].bool()].reshape(1, -1) if mask[:1].any() else ids[:1]

    def batch(n: int, length: int):
        reps = -(-length // row.shape[1])
        x = row.repeat(n, reps)[:, :length].contiguous()
        return x, torch.ones_like(x, dtype=mask.dtype)

    def timed(inputs) -> float:
        run(inputs)  # first call of this shape: not timed (allocations, compiled kernels)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            run(inputs)
            times.append(time.perf_counter() - t0)
        return float(np.min(times))  # the least-disturbed call: robust on a shared, loaded machine

    t_small, t_big = timed(batch(1, short)), timed(batch(rows, long))
    per_token = max((t_big - t_small) / (rows * long - short), 0.0)
    return CallCost(max(t_small - per_token * short, 0.0), per_token)


def plan_groups(lengths: list[int], rows: list[int], cost: CallCost) -> list[list[int]]:
    """Indices of the requests per model call, minimising the summed ``cost`` (requests sorted by
    length; each group is a contiguous run, padded to its longest). Exact for that model: dynamic
    programming over split points, O(n^2) for n requests."""
    n = len(lengths)
    if n <= 1:
        return [list(range(n))]
    order = sorted(range(n), key=lambda i: lengths[i])
    ln = [lengths[i] for i in order]
    cum = np.concatenate([[0], np.cumsum([rows[i] for i in order])])
    best = [0.0] + [float("inf")] * n
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(j):
            c = best[i] + cost.of(int(cum[j] - cum[i]), ln[j - 1])
            if c < best[j]:
                best[j], cut[j] = c, i
    groups, j = [], n
    while j > 0:
        groups.append(order[cut[j]:j])
        j = cut[j]
    return groups[::-1]
