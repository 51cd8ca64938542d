"""Latency measured fairly on a noisy machine: every (variant, runtime, batch) is timed in the
same process, interleaved in rounds, so drift hits all of them alike.

Each round visits every case once, in a fresh random order (seeded), so no case is always
timed right after the same neighbour. A visit is one untimed call (it re-warms the caches the
previous case flushed, as a server calling the same model back to back would find them) and
then the same number of timed calls for every case. ``alone`` times one case by itself, and
``sustained_throughput`` measures samples per second over back-to-back calls."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Hashable

import numpy as np
from tqdm.auto import tqdm

from .stats import bootstrap_ci


@dataclass
class Timing:
    rounds_ms: list[list[float]]  # per round, the timed calls of that round
    batch: int
    block: int                    # timed calls per round (after one untimed call)

    @property
    def samples_ms(self) -> list[float]:
        return [s for r in self.rounds_ms for s in r]

    def summary(self, seed: int = 0) -> dict[str, float]:
        """Percentiles, and a bootstrap 95% interval of the median (resampling whole rounds)."""
        a = np.asarray(self.samples_ms)
        lo, hi = bootstrap_ci(self.rounds_ms, seed=seed)
        p50, p95, p99 = (float(v) for v in np.percentile(a, [50, 95, 99]))
        return {"p50": p50, "p95": p95, "p99": p99, "mean": float(a.mean()), "runs": int(a.size),
                "calls_per_block": self.block, "p50_low": lo, "p50_high": hi}


def _call_ms(fn: Callable, x: object) -> float:
    t0 = time.perf_counter()
    fn(x)
    return (time.perf_counter() - t0) * 1000.0


def _visit(fn: Callable, x: object, block: int) -> list[float]:
    fn(x)  # untimed: re-warm after whatever ran before
    return [_call_ms(fn, x) for _ in range(block)]


def _check(rounds: int, calls_per_block: int) -> None:
    if rounds < 1 or calls_per_block < 1:
        raise ValueError(f"rounds ({rounds}) and calls_per_block ({calls_per_block}) must be >= 1")


def interleaved(cases: dict[Hashable, tuple[Callable, object, int]], rounds: int, warmup: int, *,
                calls_per_block: int = 3, seed: int = 0, progress: bool = True,
                order_log: list | None = None) -> dict[Hashable, Timing]:
    """``cases`` maps a key to (fn, inputs, batch). After ``warmup`` untimed calls per case
    (all before the first timed round: a runner that compiles per input shape, like
    torch.compile, compiles there), each round visits every case once in a seeded random order
    (appended to ``order_log`` when given): one untimed call, then ``calls_per_block`` timed calls."""
    _check(rounds, calls_per_block)
    keys = list(cases)
    rng = np.random.default_rng(seed)
    for k in keys:
        fn, x, _ = cases[k]
        for _ in range(warmup):
            fn(x)
    out = {k: Timing([], cases[k][2], calls_per_block) for k in keys}
    for _ in tqdm(range(rounds), desc="timing", disable=True if not progress else None, leave=False):
        order = [keys[i] for i in rng.permutation(len(keys))]
        if order_log is not None:
            order_log.append(order)
        for k in order:
            fn, x, _ = cases[k]
            out[k].rounds_ms.append(_visit(fn, x, calls_per_block))
    return out


def alone(fn: Callable, x: object, batch: int, rounds: int, warmup: int,
          calls_per_block: int = 3) -> Timing:
    """Time one case by itself (no other case in between), e.g. a runtime "as deployed" with
    its default options; same round structure as ``interleaved``."""
    _check(rounds, calls_per_block)
    for _ in range(warmup):
        fn(x)
    return Timing([_visit(fn, x, calls_per_block) for _ in range(rounds)], batch, calls_per_block)


def sustained_throughput(fn: Callable, x: object, batch: int, seconds: float = 1.0,
                         min_calls: int = 3) -> dict[str, float]:
    """Samples per second over back-to-back calls for at least ``seconds`` and ``min_calls``
    calls (after one untimed call): samples processed / wall time, not batch / median latency."""
    fn(x)
    calls, t0 = 0, time.perf_counter()
    while True:
        fn(x)
        calls += 1
        elapsed = time.perf_counter() - t0
        if calls >= min_calls and elapsed >= seconds:
            break
    return {"samples_per_s": batch * calls / elapsed, "calls": calls, "seconds": elapsed}
