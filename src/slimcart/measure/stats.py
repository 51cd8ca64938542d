"""Confidence intervals for latencies and speedups, by bootstrap over timing rounds.

A round is the unit that is resampled: calls within one round share the machine's state at that
moment (other load, clock speed), so they are not independent, while rounds roughly are. Two
cases timed in the same interleaved run share round indices, so their ratio is bootstrapped
*paired*: the same resampled rounds for both, which cancels the drift they had in common."""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

if TYPE_CHECKING:
    from .latency import Timing

MIN_EFFECT = 0.03  # speedups under 3% are reported as "no measured difference"


def _rounds_array(values_per_round: Sequence[Sequence[float]]) -> np.ndarray:
    lengths = {len(r) for r in values_per_round}
    if not values_per_round or len(lengths) != 1 or 0 in lengths:
        raise ValueError("need at least one round, all rounds non-empty and of equal length")
    return np.asarray(values_per_round, dtype=float)


def _boot_stats(arr: np.ndarray, idx: np.ndarray, stat: Callable) -> np.ndarray:
    """``stat`` of each resample: ``arr`` is rounds x calls, ``idx`` is n_boot x rounds."""
    return np.asarray(stat(arr[idx].reshape(idx.shape[0], -1), axis=1), dtype=float)


def bootstrap_ci(values_per_round: Sequence[Sequence[float]], stat: Callable = np.median,
                 n_boot: int = 2000, alpha: float = 0.05, seed: int = 0) -> tuple[float, float]:
    """(1 - alpha) percentile-bootstrap interval of ``stat`` over all values, resampling whole
    rounds with replacement. ``stat`` must accept ``axis`` (as numpy reductions do)."""
    arr = _rounds_array(values_per_round)
    idx = np.random.default_rng(seed).integers(0, arr.shape[0], size=(n_boot, arr.shape[0]))
    lo, hi = np.quantile(_boot_stats(arr, idx, stat), [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


def speedup(base: Timing, other: Timing, *, n_boot: int = 2000, seed: int = 0,
            min_effect: float = MIN_EFFECT) -> dict[str, float | str]:
    """How many times faster ``other`` is than ``base`` (ratio of p50s), with a 95% interval
    from a paired bootstrap over round indices. Both must come from the same interleaved run
    (same number of rounds). The verdict is "faster" / "slower" only when the interval excludes
    1 *and* the effect is at least ``min_effect`` (3%): smaller differences are reported as
    "no measured difference", so that run-to-run noise is not sold as a speedup."""
    a, b = _rounds_array(base.rounds_ms), _rounds_array(other.rounds_ms)
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"timings have {a.shape[0]} and {b.shape[0]} rounds; pairing needs equal counts")
    x = float(np.median(a) / np.median(b))
    idx = np.random.default_rng(seed).integers(0, a.shape[0], size=(n_boot, a.shape[0]))
    ratios = _boot_stats(a, idx, np.median) / _boot_stats(b, idx, np.median)
    low, high = (float(v) for v in np.quantile(ratios, [0.025, 0.975]))
    if low > 1 and x >= 1 + min_effect:
        verdict = "faster"
    elif high < 1 and x <= 1 / (1 + min_effect):
        verdict = "slower"
    else:
        verdict = "no measured difference"
    return {"x": x, "low": low, "high": high, "verdict": verdict}


def fmt_speedup(d: dict) -> str:
    """E.g. ``2.31x [2.20, 2.41]`` or ``1.02x [0.97, 1.06] (no measured difference)``."""
    s = f"{d['x']:.2f}x [{d['low']:.2f}, {d['high']:.2f}]"
    return s + " (no measured difference)" if d["verdict"] == "no measured difference" else s
