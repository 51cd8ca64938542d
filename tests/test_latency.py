"""Block-interleaved timing: every case gets rounds x block samples, blocks are sized from the
warm-up speed, and an untimed call precedes each block."""
import time

from slimcart.measure.latency import MAX_BLOCK, block_size, interleaved


def test_block_size_from_warmup_speed():
    assert block_size([0.1, 0.1]) == MAX_BLOCK        # fast calls: a full block
    assert block_size([5.0, 5.0]) == 4                # 20 ms budget / 5 ms
    assert block_size([80.0]) == 1                    # slow calls: one timed call per round


def test_interleaved_counts_and_untimed_rewarm():
    calls = {"fast": 0, "slow": 0}

    def make(name, ms):
        def fn(_x):
            calls[name] += 1
            time.sleep(ms / 1000)
        return fn

    cases = {("fast",): (make("fast", 0.2), None, 1), ("slow",): (make("slow", 30), None, 64)}
    out = interleaved(cases, rounds=3, warmup=2, progress=False)
    fast, slow = out[("fast",)], out[("slow",)]
    assert (fast.block, slow.block) == (MAX_BLOCK, 1)
    assert len(fast.samples_ms) == 3 * MAX_BLOCK and len(slow.samples_ms) == 3
    # warm-up + per round (one untimed re-warm + the timed block)
    assert calls == {"fast": 2 + 3 * (1 + MAX_BLOCK), "slow": 2 + 3 * 2}
    assert min(slow.samples_ms) >= 30 and slow.summary()["calls_per_block"] == 1
    assert slow.throughput() < 64 / 0.030
