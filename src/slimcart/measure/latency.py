"""Latency measured fairly on a noisy machine: every (variant, runtime, batch) is timed in the
same process, interleaved in rounds (A B C A B C ...), so drift hits all of them alike."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
from tqdm.auto import tqdm


@dataclass
class Timing:
    samples_ms: list[float]
    batch: int

    def summary(self) -> dict[str, float]:
        a = np.asarray(self.samples_ms)
        return {"p50": float(np.percentile(a, 50)), "p95": float(np.percentile(a, 95)),
                "p99": float(np.percentile(a, 99)), "mean": float(a.mean()), "runs": int(a.size)}

    def throughput(self) -> float:
        return self.batch / (float(np.median(self.samples_ms)) / 1000.0)


def interleaved(cases: dict[tuple, tuple[Callable, object, int]], rounds: int, warmup: int,
                progress: bool = True) -> dict[tuple, Timing]:
    """``cases`` maps a key to (fn, inputs, batch). Each round times every case once,
    in an order rotated per round."""
    keys = list(cases)
    for k in keys:
        fn, x, _ = cases[k]
        for _ in range(warmup):
            fn(x)
    out = {k: Timing([], cases[k][2]) for k in keys}
    for r in tqdm(range(rounds), desc="timing", disable=True if not progress else None, leave=False):
        shift = r % len(keys)
        for k in keys[shift:] + keys[:shift]:
            fn, x, _ = cases[k]
            t0 = time.perf_counter()
            fn(x)
            out[k].samples_ms.append((time.perf_counter() - t0) * 1000.0)
    return out
