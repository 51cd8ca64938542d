"""Canonical Huffman coding: exact round trips, valid prefix codes, near-entropy sizes, and
damaged streams rejected."""
import numpy as np
import pytest

from slimcart.storage import huffman


def _entropy_bits(s: np.ndarray) -> float:
    p = np.bincount(s) / len(s)
    p = p[p > 0]
    return float(-(p * np.log2(p)).sum())


STREAMS = {
    "empty": np.zeros(0, dtype=np.int64),
    "one symbol once": np.array([42]),
    "single symbol": np.full(10_000, 7),
    "two symbols": np.array([0, 1] * 50 + [1] * 900),
    "uniform bytes": np.random.default_rng(0).integers(0, 256, 50_000),
    "skewed (geometric gaps)": np.random.default_rng(1).geometric(0.08, 60_000) - 1,
    "skewed uint8": np.minimum(np.random.default_rng(2).geometric(0.3, 9_000), 255).astype(np.uint8),
    "large alphabet": np.random.default_rng(3).zipf(1.5, 20_000) % 5000,
    "not a block multiple": np.random.default_rng(4).integers(3, 9, 4096 * 3 + 17),
}


@pytest.mark.parametrize("name", list(STREAMS))
def test_round_trip(name):
    s = STREAMS[name]
    data = huffman.encode(s)
    back = huffman.decode(data)
    assert back.dtype == np.int64 and np.array_equal(back, s.astype(np.int64))


@pytest.mark.parametrize("name", [n for n in STREAMS if len(STREAMS[n]) > 1])
def test_code_is_a_complete_prefix_code_within_the_entropy_bound(name):
    s = STREAMS[name].astype(np.int64)
    lengths = huffman.code_lengths(np.bincount(s))
    used = lengths[lengths > 0]
    kraft = float(np.sum(2.0 ** -used))
    assert kraft <= 1.0 and (len(used) == 1 or kraft == 1.0)
    info = huffman.stream_info(huffman.encode(s))
    assert info["n"] == len(s)
    assert info["nbits"] == int(lengths[s].sum())
    assert info["nbits"] <= len(s) * (_entropy_bits(s) + 1)
    if len(used) > 1:  # and no shorter than the entropy: it is a prefix code
        assert info["nbits"] >= len(s) * _entropy_bits(s) - 1e-6


def test_canonical_codes_are_prefix_free_and_ordered():
    freqs = np.array([5, 9, 12, 13, 16, 45, 0, 1])
    lengths = huffman.code_lengths(freqs)
    codes = huffman.canonical_codes(lengths)
    words = {s: format(int(codes[s]), f"0{lengths[s]}b") for s in np.flatnonzero(lengths)}
    for a, wa in words.items():
        for b, wb in words.items():
            assert a == b or not wb.startswith(wa)
    assert lengths[6] == 0 and lengths[5] == 1 and words[5] == "0"  # most frequent: shortest, first
    order = sorted(words, key=lambda s: (lengths[s], s))
    assert [int(words[s], 2) << (lengths.max() - lengths[s]) for s in order] == \
        sorted(int(words[s], 2) << (lengths.max() - lengths[s]) for s in order)


def test_lengths_are_limited():
    fib = [1, 1]
    while len(fib) < 40:
        fib.append(fib[-1] + fib[-2])
    lengths = huffman.code_lengths(np.array(fib), max_len=huffman.MAX_LEN)
    assert lengths.max() <= huffman.MAX_LEN and np.sum(2.0 ** -lengths) <= 1.0
    s = np.repeat(np.arange(30), fib[:30])
    assert np.array_equal(huffman.decode(huffman.encode(s)), s)


def test_bad_input_and_damaged_streams():
    with pytest.raises(ValueError, match="non-negative"):
        huffman.encode(np.array([1, -1]))
    s = np.random.default_rng(5).geometric(0.2, 10_000) - 1
    data = huffman.encode(s)
    with pytest.raises(ValueError, match="truncated|payload"):
        huffman.decode(data[:-3])
    with pytest.raises(ValueError):
        huffman.decode(data + b"\0")
    info = huffman.stream_info(data)
    broken = bytearray(data)
    for offset in (info["payload_offset"] + 5, len(data) // 2):
        broken[offset] ^= 0xFF
        try:  # a flipped payload byte decodes to other symbols or fails, never silently the same
            assert not np.array_equal(huffman.decode(bytes(broken)), s)
        except ValueError:
            pass
