"""Bootstrap intervals over rounds and paired speedups: identical cases show no difference,
a 3x slower case is detected, and effects under 3% are never reported as a speedup."""
import time

import numpy as np
import pytest

from slimcart.measure.latency import Timing, interleaved
from slimcart.measure.stats import bootstrap_ci, fmt_speedup, speedup


def test_bootstrap_ci_contains_the_median_and_is_fast():
    rounds = np.random.default_rng(1).lognormal(0.0, 0.2, size=(30, 3)).tolist()
    t0 = time.perf_counter()
    lo, hi = bootstrap_ci(rounds, n_boot=2000)
    assert time.perf_counter() - t0 < 1.0
    assert lo < float(np.median(rounds)) < hi
    assert bootstrap_ci(rounds, seed=5) == bootstrap_ci(rounds, seed=5)


def test_identical_cases_show_no_measured_difference():
    # One function timed as two cases. Short single-threaded calls (a fraction of a millisecond)
    # are rarely preempted, and 150 rounds keep the ratio of medians within about 1% even on a
    # loaded machine, well inside the 3% min_effect that a "faster" verdict also needs.
    data = np.random.default_rng(0).random(30_000)

    def work(_x):
        np.sort(data)

    out = interleaved({"a": (work, None, 1), "b": (work, None, 1)}, rounds=150, warmup=3, progress=False)
    d = speedup(out["a"], out["b"])
    assert d["verdict"] == "no measured difference", d
    assert 0.9 < d["x"] < 1.1


def test_three_times_slower_case_is_detected():
    def sleeper(ms):
        return lambda _x: time.sleep(ms / 1000)

    out = interleaved({"slow": (sleeper(6), None, 1), "fast": (sleeper(2), None, 1)},
                      rounds=10, warmup=1, progress=False)
    d = speedup(out["slow"], out["fast"])
    assert d["verdict"] == "faster" and d["low"] > 1 and 2.2 < d["x"] < 3.3, d
    assert d["low"] <= d["x"] <= d["high"]
    assert speedup(out["fast"], out["slow"])["verdict"] == "slower"


def test_small_but_certain_difference_is_not_a_speedup():
    noise = np.random.default_rng(2).normal(0.0, 0.001, size=(30, 3))
    base, other = Timing((1.02 + noise).tolist(), 1, 3), Timing((1.0 + noise).tolist(), 1, 3)
    d = speedup(base, other)
    assert d["low"] > 1 and d["verdict"] == "no measured difference"
    assert speedup(Timing((1.05 + noise).tolist(), 1, 3), other)["verdict"] == "faster"


def test_mismatched_rounds_raise():
    with pytest.raises(ValueError):
        speedup(Timing([[1.0, 1.0, 1.0]] * 5, 1, 3), Timing([[1.0, 1.0, 1.0]] * 6, 1, 3))


def test_fmt_speedup():
    assert fmt_speedup({"x": 2.314, "low": 2.2, "high": 2.409, "verdict": "faster"}) == "2.31x [2.20, 2.41]"
    assert fmt_speedup({"x": 1.02, "low": 0.97, "high": 1.06, "verdict": "no measured difference"}) \
        == "1.02x [0.97, 1.06] (no measured difference)"
    assert fmt_speedup({"x": 0.5, "low": 0.48, "high": 0.52, "verdict": "slower"}) == "0.50x [0.48, 0.52]"
