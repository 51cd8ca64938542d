"""Exact storage for weight-shared tensors (few distinct values): a codebook and b-bit indices.

A float tensor (float32/float16/bfloat16/float64) of at least ``sparse.MIN_ELEMENTS`` elements
that holds at most ``MAX_VALUES`` distinct values is stored in whichever of these takes the
fewest bytes, if that is fewer than its dense or sparse form (see storage/sparse.py):

``codebook``         ``{name}::codebook``: the distinct values, ascending by bit pattern, in the
                     original dtype (a zero is one of them); ``{name}::indices``: uint8, one
                     ``b``-bit index into the codebook per element of the row-major flattened
                     tensor, ``b = max(1, ceil(log2(len(codebook))))``, packed most significant
                     bit first (``np.packbits`` order), the last byte padded with zero bits.
``codebook_sparse``  ``{name}::codebook``: the distinct non-zero values; ``{name}::gaps``: uint8,
                     relative positions as in Deep Compression (sparse.py's ``relative``), with an
                     escape: a gap ``g < 255`` is the number of zeros skipped before the next
                     non-zero, a gap of 255 stands for 255 zeros and no value (longer runs of
                     zeros); ``{name}::indices``: one ``b``-bit index per non-zero, packed as above.

Positions of the non-zeros are ``cumsum(where(g == 255, 255, g + 1))[g < 255] - 1``. As in
sparse.py a zero of either sign is a zero (restored as +0.0) in ``codebook_sparse``; in
``codebook`` every value, -0.0 and NaN included, is restored bit for bit.
"""
from __future__ import annotations

from math import prod
from typing import Any

import numpy as np
import torch

from .sparse import DTYPES, MIN_ELEMENTS, OVERHEAD, encode_state as sparse_encode

MAX_VALUES = 256
ESCAPE = 255
PARTS = ("codebook", "indices", "gaps")
_INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16,
             torch.float64: torch.int64}


def index_bits(values: int) -> int:
    return max(1, (values - 1).bit_length())


def pack_indices(idx: np.ndarray, bits: int) -> np.ndarray:
    """``bits`` bits per index, most significant first, into uint8 bytes (np.packbits order)."""
    fields = (idx.astype(np.uint8)[:, None] >> np.arange(bits - 1, -1, -1, dtype=np.uint8)) & 1
    return np.packbits(fields.reshape(-1))


def unpack_indices(packed: np.ndarray, count: int, bits: int) -> np.ndarray:
    flags = np.unpackbits(packed)
    if len(flags) < count * bits:
        raise ValueError(f"{len(packed)} index bytes hold fewer than {count} indices of {bits} bits")
    fields = flags[:count * bits].reshape(count, bits).astype(np.int64)
    return fields @ (np.int64(1) << np.arange(bits - 1, -1, -1))


def relative_gaps(mask: np.ndarray, escape: int = ESCAPE) -> np.ndarray:
    """Escape-coded gaps of the set positions of the boolean ``mask`` (see the module docstring)."""
    pos = np.flatnonzero(mask)
    skips = np.diff(pos, prepend=-1) - 1
    fillers = skips // escape
    index = np.cumsum(fillers + 1) - 1          # where each real entry sits among all entries
    gaps = np.full(len(pos) + int(fillers.sum()), escape, dtype=np.int64)
    gaps[index] = skips % escape
    return gaps


def gap_positions(gaps: np.ndarray, n: int, escape: int = ESCAPE) -> np.ndarray:
    """Positions of the non-zeros coded by ``gaps``; ValueError if they run past ``n`` elements."""
    gaps = gaps.astype(np.int64)
    if len(gaps) and (gaps.min() < 0 or gaps.max() > escape):
        raise ValueError(f"gaps outside 0..{escape}")
    step = np.where(gaps == escape, escape, gaps + 1)
    pos = (np.cumsum(step) - 1)[gaps != escape]
    if len(pos) and pos[-1] >= n:
        raise ValueError(f"gaps run past the {n} elements of the tensor")
    return pos


def distinct(t: torch.Tensor, limit: int = MAX_VALUES) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(distinct values sorted by bit pattern, index of each element) or None if more than ``limit``."""
    flat = t.detach().reshape(-1).contiguous().cpu()
    bits = flat.view(_INT_VIEW[flat.dtype])
    sample = bits[torch.randperm(len(bits), generator=torch.Generator().manual_seed(0))[:4096]]
    if len(torch.unique(sample)) > limit:
        return None
    uniq, idx = torch.unique(bits, return_inverse=True)
    if len(uniq) > limit:
        return None
    return uniq.view(flat.dtype), idx


def _encode_one(t: torch.Tensor) -> tuple[dict[str, Any], dict[str, torch.Tensor], int] | None:
    """The smaller codebook form of ``t`` and its bytes, or None if it has too many values."""
    got = distinct(t)
    if got is None:
        return None
    values, idx = got
    flat = t.detach().reshape(-1).cpu()
    n, size = flat.numel(), flat.element_size()
    entry = {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
    nz_mask = (flat != 0).numpy()
    nnz = int(nz_mask.sum())
    nz_values = values[values != 0]
    b_dense, b_sparse = index_bits(len(values)), index_bits(max(1, len(nz_values)))
    dense_cost = len(values) * size + (n * b_dense + 7) // 8
    gaps = relative_gaps(nz_mask)
    sparse_cost = len(nz_values) * size + len(gaps) + (nnz * b_sparse + 7) // 8 + OVERHEAD
    if dense_cost <= sparse_cost:
        packed = pack_indices(idx.numpy(), b_dense)
        return ({**entry, "encoding": "codebook", "index_bits": b_dense, "values": len(values)},
                {"codebook": values.clone(), "indices": torch.from_numpy(packed)}, dense_cost)
    # indices into the non-zero codebook: ranks of the non-zero values among themselves
    remap = torch.cumsum((values != 0).to(torch.int64), 0) - 1
    nz_idx = remap[idx[torch.from_numpy(nz_mask)]].numpy()
    packed = pack_indices(nz_idx, b_sparse)
    return ({**entry, "encoding": "codebook_sparse", "index_bits": b_sparse, "values": len(nz_values),
             "nnz": nnz, "entries": len(gaps)},
            {"codebook": nz_values.clone(), "gaps": torch.from_numpy(gaps.astype(np.uint8)),
             "indices": torch.from_numpy(packed)}, sparse_cost)


def encode_state(tensors: dict[str, torch.Tensor]
                 ) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, Any]], dict[str, torch.Tensor]]:
    """(stored codebook parts, their manifest entries, the tensors left for the sparse encoder)."""
    out: dict[str, torch.Tensor] = {}
    entries: dict[str, dict[str, Any]] = {}
    rest: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        parts = None
        if t.dtype in DTYPES.values() and t.numel() >= MIN_ELEMENTS and \
                not any(f"{name}::{p}" in tensors for p in PARTS):
            parts = _encode_one(t)
        if parts is not None:
            stored, _ = sparse_encode({name: t})
            other = sum(v.numel() * v.element_size() for v in stored.values())
            if len(stored) > 1:
                other += OVERHEAD
            if parts[2] + OVERHEAD < other:
                entries[name] = parts[0]
                out.update({f"{name}::{p}": v for p, v in parts[1].items()})
                continue
        rest[name] = t
    return out, entries, rest


def decode_state(tensors: dict[str, torch.Tensor], entries: dict[str, dict[str, Any]]
                 ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(decoded codebook tensors, the stored tensors that are not theirs)."""
    used = {f"{name}::{p}" for name in entries for p in PARTS}
    rest = {k: v for k, v in tensors.items() if k not in used}
    out = {}
    for name, entry in entries.items():
        try:
            out[name] = _decode_one(name, entry, tensors)
        except (KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"{name}: malformed or missing stored data ({exc!r})") from None
    return out, rest


def _decode_one(name: str, entry: dict[str, Any], tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    def fail(why: str) -> ValueError:
        return ValueError(f"{name}: {why}")

    shape, dtype, encoding = entry["shape"], DTYPES.get(entry["dtype"]), entry["encoding"]
    if dtype is None or not all(isinstance(s, int) and s >= 0 for s in shape):
        raise fail(f"bad dtype {entry['dtype']!r} or shape {shape!r}")
    if encoding not in ("codebook", "codebook_sparse"):
        raise fail(f"unknown encoding {encoding!r}")
    n, bits = prod(shape), entry["index_bits"]
    book, packed = tensors.get(f"{name}::codebook"), tensors.get(f"{name}::indices")
    if book is None or book.dtype != dtype or book.dim() != 1 or len(book) != entry["values"]:
        raise fail(f"{name}::codebook missing or not {entry['values']} {entry['dtype']} values")
    if packed is None or packed.dtype != torch.uint8 or not 1 <= bits <= 8:
        raise fail(f"{name}::indices missing or not uint8, or bad index_bits {bits!r}")
    if encoding == "codebook":
        idx = unpack_indices(packed.numpy(), n, bits)
        if len(idx) and idx.max() >= len(book):
            raise fail(f"an index points past the {len(book)} codebook values")
        return book[torch.from_numpy(idx)].reshape(shape)
    gaps = tensors.get(f"{name}::gaps")
    if gaps is None or gaps.dtype != torch.uint8 or gaps.dim() != 1 or len(gaps) != entry["entries"]:
        raise fail(f"{name}::gaps missing or not {entry['entries']} uint8 gaps")
    try:
        pos = gap_positions(gaps.numpy(), n)
        idx = unpack_indices(packed.numpy(), len(pos), bits)
    except ValueError as exc:
        raise fail(str(exc)) from None
    if len(pos) != entry["nnz"] or (len(idx) and idx.max() >= len(book)):
        raise fail(f"gaps hold {len(pos)} non-zeros (expected nnz={entry['nnz']}) or an index is out of range")
    out = torch.zeros(n, dtype=dtype)
    out[torch.from_numpy(pos)] = book[torch.from_numpy(idx)]
    return out.reshape(shape)
