import numpy as np
import pytest

from slimcart.data.synthetic import SyntheticSpec, generate, parse_spec
from slimcart.errors import DataError


@pytest.fixture(scope="module")
def default_log():
    return generate(SyntheticSpec())


def test_deterministic_per_seed():
    spec = SyntheticSpec(rows=5000, vocab=1000, seed=7)
    a, b = generate(spec), generate(spec)
    for name in ("sparse", "dense", "labels", "true_prob"):
        assert np.array_equal(getattr(a, name), getattr(b, name))
    c = generate(SyntheticSpec(rows=5000, vocab=1000, seed=8))
    assert not np.array_equal(a.sparse, c.sparse)
    assert not np.array_equal(a.true_prob, c.true_prob)


def test_shapes_types_and_ranges(default_log):
    log, spec = default_log, default_log.spec
    assert log.sparse.shape == (spec.rows, spec.fields) and log.sparse.dtype == np.int64
    assert log.dense.shape == (spec.rows, spec.dense) and log.dense.dtype == np.float32
    assert log.labels.dtype == np.float32 and log.true_prob.dtype == np.float32
    assert log.sparse.min() >= 0 and log.sparse.max() < spec.vocab
    assert set(np.unique(log.labels)) == {0.0, 1.0}
    assert 0.0 < log.true_prob.min() and log.true_prob.max() < 1.0
    assert abs(float(log.dense.mean())) < 0.02 and abs(float(log.dense.std()) - 1) < 0.02


def test_power_law(default_log):
    log = default_log
    for field in range(log.spec.fields):
        counts = log.id_counts(field)
        assert counts.shape == (log.spec.vocab,) and counts.sum() == log.spec.rows
        seen = counts[counts > 0]
        assert counts.max() > 10 * np.median(seen)
        top = np.sort(counts)[::-1][: log.spec.vocab // 100]
        assert top.sum() / log.spec.rows > 0.5
        first, second = np.sort(counts)[::-1][:2]
        assert first > 1.4 * second  # rank 1 is clearly the most frequent id
    # frequent ids are scattered over the id space, not packed at the start
    top_ids = np.argsort(log.id_counts(0))[::-1][:20]
    assert top_ids.max() - top_ids.min() > log.spec.vocab // 10


def test_click_rate_and_ceiling(default_log):
    assert abs(float(default_log.labels.mean()) - 0.1) < 0.05
    assert abs(float(default_log.true_prob.mean()) - 0.1) < 0.05
    assert 0.70 < default_log.ceiling_auc() < 0.95
    low = generate(SyntheticSpec(rows=20000, base_rate=0.3, seed=2))
    assert abs(float(low.labels.mean()) - 0.3) < 0.05


def test_huge_vocab_small_rows():
    log = generate(parse_spec("synthetic:rows=20000,fields=26,vocab=10000000"))
    assert log.sparse.shape == (20000, 26)
    assert log.sparse.max() > 1_000_000 and log.sparse.max() < 10_000_000


def test_single_field_no_dense():
    log = generate(SyntheticSpec(rows=2000, fields=1, dense=0, vocab=50))
    assert log.dense.shape == (2000, 0)
    assert log.sparse.max() < 50


def test_id_counts_bad_field(default_log):
    with pytest.raises(DataError, match="field=8"):
        default_log.id_counts(8)


def test_parse_spec():
    assert parse_spec("synthetic") == SyntheticSpec()
    spec = parse_spec("synthetic:rows=1000000,fields=26,vocab=10000000,seed=3")
    assert (spec.rows, spec.fields, spec.vocab, spec.seed) == (1_000_000, 26, 10_000_000, 3)
    assert spec.dense == 2
    spec = parse_spec(" synthetic: alpha=1.5 , base_rate=0.2, rows=1e4, dense=0 ")
    assert (spec.alpha, spec.base_rate, spec.rows, spec.dense) == (1.5, 0.2, 10000, 0)
    assert isinstance(spec.rows, int)


@pytest.mark.parametrize("text, match", [
    ("synthetic:colour=3", "unknown key 'colour'"),
    ("synthetic:rows", "'rows' has no value"),
    ("synthetic:rows=abc", "rows='abc' is not a number"),
    ("synthetic:rows=1.5", "rows='1.5' is not an integer"),
    ("synthetic:rows=99", "rows=99 .*>= 100"),
    ("synthetic:fields=0", "fields=0 .*1 to 100"),
    ("synthetic:fields=101", "fields=101 .*1 to 100"),
    ("synthetic:vocab=1", "vocab=1 .*2 to 10000000"),
    ("synthetic:vocab=10000001", "vocab=10000001 .*2 to 10000000"),
    ("synthetic:dense=-1", "dense=-1 .*0 to 64"),
    ("synthetic:dense=65", "dense=65 .*0 to 64"),
    ("synthetic:alpha=0.4", "alpha=0.4 .*>= 0.5"),
    ("synthetic:alpha=nan", "alpha=nan .*>= 0.5"),
    ("synthetic:base_rate=0", "base_rate=0.0 .*between 0 and 1"),
    ("synthetic:base_rate=1", "base_rate=1.0 .*between 0 and 1"),
    ("synthetic:embed_dim=0", "embed_dim=0 .*1 to 64"),
    ("synthetic:seed=-1", "seed=-1 .*>= 0"),
    ("synthetic:seed=1,seed=2", "'seed' is given twice"),
    ("criteo", "not a synthetic spec"),
])
def test_parse_spec_errors(text, match):
    with pytest.raises(DataError, match=match):
        parse_spec(text)


def test_spec_checked_when_built_directly():
    with pytest.raises(DataError, match="rows"):
        SyntheticSpec(rows=10)
    with pytest.raises(DataError, match="fields"):
        SyntheticSpec(fields=2.5)
