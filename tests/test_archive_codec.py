"""The .scz tensor codec: per-tensor gap escapes and exact half-precision parts."""
import numpy as np
import pytest
import torch

from slimcart.storage import archive_codec as codec
from slimcart.storage.codebook import ESCAPE


def _round_trip(t):
    entry, parts = codec.encode_tensor(t)
    back = codec.decode_tensor(entry, parts)
    assert back.dtype == t.dtype and back.shape == t.shape
    assert torch.equal(back.view(torch.int32) if t.dtype == torch.float32 else back,
                       t.view(torch.int32) if t.dtype == torch.float32 else t)
    return entry, parts


def _sparse_shared(n=60_000, density=0.03, values=16, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    book = torch.linspace(-0.3, 0.3, values).half().to(dtype)
    t = book[torch.randint(0, values, (n,), generator=g)]
    return torch.where(torch.rand(n, generator=g) < density, t, torch.zeros(()))


def test_sparse_tensor_picks_a_smaller_escape_and_decodes_exactly():
    t = _sparse_shared()
    entry, parts = _round_trip(t)
    assert entry["kind"] == "shared_sparse"
    assert entry["escape"] in codec.ESCAPES and entry["escape"] < ESCAPE
    best = min(len(codec.huffman.encode(codec.relative_gaps(t.numpy() != 0, e))) for e in codec.ESCAPES)
    assert len(parts["gaps"]) == best
    fixed = len(codec.huffman.encode(codec.relative_gaps(t.numpy() != 0, ESCAPE)))
    assert len(parts["gaps"]) < fixed


def test_entries_without_escape_decode_with_255():
    t = _sparse_shared(density=0.001)   # long gaps: 255 is the best bound, so no "escape" key
    entry, parts = _round_trip(t)
    if "escape" in entry:
        entry = dict(entry)
        del entry["escape"]
        with pytest.raises(ValueError):
            codec.decode_tensor(entry, parts)
    else:
        assert codec.decode_tensor(entry, parts).equal(t)


def test_half_exact_codebook_is_stored_in_two_bytes():
    t = _sparse_shared(density=0.5)
    entry, parts = _round_trip(t)
    assert entry["half"] == {"codebook": "float16"}
    assert len(parts["codebook"]) <= 2 * 17   # 16 centroids and the zero of the pruned weights


def test_values_not_exact_in_half_stay_float32():
    t = torch.randn(300, generator=torch.Generator().manual_seed(1))
    entry, parts = _round_trip(t)
    assert "half" not in entry and entry["kind"] == "raw"


def test_bfloat16_exact_values_use_bfloat16():
    t = (torch.randn(300, generator=torch.Generator().manual_seed(2)) * 1e6).bfloat16().float()
    entry, _ = _round_trip(t)
    assert entry["half"] == {"raw": "bfloat16"}


def test_integer_tensors_are_never_halved():
    t = torch.arange(0, 2000, dtype=torch.int32)
    entry, _ = _round_trip(t)
    assert "half" not in entry


def test_special_values_survive():
    t = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 1.5, float("nan"), 65504.0, 1e-8])
    _round_trip(t)
    u = np.array([0x7FC00001], dtype=np.uint32)   # a NaN payload that float16 would lose
    assert codec._halve(u) is None


@pytest.mark.parametrize("bad, match", [({"escape": 0}, "escape"), ({"escape": "x"}, "escape"),
                                        ({"half": ["codebook"]}, "half"),
                                        ({"half": {"codebook": "float8"}}, "half format")])
def test_damaged_entries_raise_value_errors(bad, match):
    entry, parts = codec.encode_tensor(_sparse_shared(density=0.5))
    with pytest.raises(ValueError, match=match):
        codec.decode_tensor({**entry, **bad}, parts)


def test_half_part_on_an_int_tensor_is_refused():
    entry, parts = codec.encode_tensor(torch.arange(100, dtype=torch.int32))
    with pytest.raises(ValueError, match="half"):
        codec.decode_tensor({**entry, "half": {"raw": "float16"}}, parts)
