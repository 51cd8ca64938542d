import numpy as np

from slimcart.tasks.base import PREDICT_BYTES
from slimcart.tasks.ctr import CTRTask


def task(width: int, n: int = 300) -> CTRTask:
    g = np.random.default_rng(0)
    sparse, dense = g.integers(0, 5, (n, 1)), g.normal(size=(n, width)).astype(np.float32)
    info = {"dense": [f"d{i}" for i in range(width)], "vocab_sizes": [5], "categorical": ["c"]}
    return CTRTask._from_arrays("t", sparse, dense, np.zeros(n, np.float32),
                                (np.arange(0, 100), np.arange(100, 200), np.arange(200, n)), info)


def batch_sizes(t: CTRTask) -> list[int]:
    sizes = []
    out = t.predict(lambda x: sizes.append(len(x[0])) or np.zeros(len(x[0])), "test")
    assert len(out) == 100
    return sizes


def test_scoring_batches_shrink_for_large_rows():
    assert batch_sizes(task(4)) == [100]  # small rows: up to 256 a batch
    row = 8 + 4 * 200_000  # one id + 200k float features
    big = batch_sizes(task(200_000))
    assert max(big) == PREDICT_BYTES // row and sum(big) == 100
