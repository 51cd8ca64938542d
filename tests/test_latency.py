"""Interleaved timing: a fresh random case order every round, the same number of timed calls for
every case (after one untimed call), exact call counts, and throughput from wall time."""
import time

import pytest

from slimcart.measure.latency import alone, interleaved, sustained_throughput


def _counter(calls: dict, name: str, ms: float = 0.0):
    def fn(_x):
        calls[name] += 1
        if ms:
            time.sleep(ms / 1000)
    return fn


def test_order_is_reshuffled_every_round_and_seeded():
    keys = [("a", 1), ("b", 1), ("c", 8), ("d", 8)]
    calls = dict.fromkeys(keys, 0)
    cases = {k: (_counter(calls, k), None, k[1]) for k in keys}
    log: list = []
    interleaved(cases, rounds=12, warmup=0, seed=3, progress=False, order_log=log)
    assert len(log) == 12
    assert all(sorted(order) == sorted(keys) for order in log)      # each key once per round
    assert len({tuple(order) for order in log}) > 1                 # the order changes
    again: list = []
    interleaved(cases, rounds=12, warmup=0, seed=3, progress=False, order_log=again)
    assert again == log                                             # reproducible from the seed


def test_every_case_gets_the_same_block_and_exact_call_counts():
    calls = {"fast": 0, "slow": 0}
    cases = {"fast": (_counter(calls, "fast"), None, 1), "slow": (_counter(calls, "slow", 5), None, 64)}
    out = interleaved(cases, rounds=4, warmup=2, calls_per_block=3, progress=False)
    for t in out.values():
        assert t.block == 3 and len(t.rounds_ms) == 4
        assert all(len(r) == 3 for r in t.rounds_ms) and len(t.samples_ms) == 12
        s = t.summary()
        assert s["runs"] == 12 and s["calls_per_block"] == 3
        assert s["p50_low"] <= s["p50"] <= s["p50_high"]
    assert calls == {"fast": 2 + 4 * (1 + 3), "slow": 2 + 4 * (1 + 3)}
    assert min(out["slow"].samples_ms) >= 5 and out["slow"].batch == 64


def test_alone_returns_rounds_by_block():
    calls = {"x": 0}
    t = alone(_counter(calls, "x"), None, batch=8, rounds=5, warmup=3, calls_per_block=2)
    assert [len(r) for r in t.rounds_ms] == [2] * 5 and t.batch == 8 and t.block == 2
    assert calls["x"] == 3 + 5 * (1 + 2)


def test_rounds_and_block_must_be_positive():
    with pytest.raises(ValueError):
        interleaved({"a": (len, [], 1)}, rounds=0, warmup=0, progress=False)
    with pytest.raises(ValueError):
        alone(len, [], 1, rounds=2, warmup=0, calls_per_block=0)


def test_sustained_throughput_is_samples_over_wall_time():
    got = sustained_throughput(lambda _x: time.sleep(0.005), None, batch=64, seconds=0.3)
    ideal = 64 / 0.005
    assert 0.3 * ideal <= got["samples_per_s"] <= 1.1 * ideal
    assert got["calls"] >= 3 and got["seconds"] >= 0.3
    assert got["samples_per_s"] == pytest.approx(64 * got["calls"] / got["seconds"])
