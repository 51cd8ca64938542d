"""Exact sparse encodings for pruned weights, so bytes on disk fall with sparsity.

Every float tensor (float32/float16/bfloat16/float64) of at least ``MIN_ELEMENTS`` elements is
stored in whichever of these takes the fewest bytes (dense unless a sparse form is smaller):

``dense``     the tensor as is, under its own name.
``bitmask``   ``{name}::mask``: uint8, one bit per element of the row-major flattened tensor,
              ``np.packbits`` order (element i is bit ``7 - i % 8`` of byte ``i // 8``; the
              padding bits of the last byte are 0), and ``{name}::values``: the non-zero
              values in order, in the original dtype.
``relative``  (Han et al., Deep Compression) ``{name}::gaps``: uint8 or uint16, for each entry
              the number of zeros skipped since the previous entry, and ``{name}::values``.
              A run of zeros longer than the largest gap is bridged by filler entries with
              gap ``2**bits - 1`` and value 0. Trailing zeros need no entry.

Positions of the non-zeros are ``cumsum(gaps + 1) - 1``. A zero is any value that compares
equal to 0, so a -0.0 weight is restored as +0.0 (numerically identical); every other value,
NaN included, is restored bit for bit. The manifest lists the sparse tensors only; tensors
not in it are stored dense.
"""
from __future__ import annotations

from math import prod
from typing import Any

import numpy as np
import torch

MIN_ELEMENTS = 1024
# Rough bytes a sparse tensor adds beyond its data: its manifest entry and one more
# safetensors header entry. Sparse is chosen only when it wins by more than this.
OVERHEAD = 320
DTYPES = {str(d).removeprefix("torch."): d
          for d in (torch.float32, torch.float16, torch.bfloat16, torch.float64)}
GAP_DTYPES = {8: np.uint8, 16: np.uint16}


def encode_state(tensors: dict[str, torch.Tensor]
                 ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    out: dict[str, torch.Tensor] = {}
    entries: dict[str, dict[str, Any]] = {}
    for name, t in tensors.items():
        parts = None
        if t.dtype in DTYPES.values() and t.numel() >= MIN_ELEMENTS and \
                not any(f"{name}::{p}" in tensors for p in ("mask", "values", "gaps")):
            parts = _encode_one(t.detach())
        if parts is None:
            out[name] = t
            continue
        entry, stored = parts
        entries[name] = entry
        out.update({f"{name}::{p}": v for p, v in stored.items()})
    return out, {"scheme": "sparse", "version": 1, "tensors": entries}


def _encode_one(t: torch.Tensor) -> tuple[dict[str, Any], dict[str, torch.Tensor]] | None:
    flat = t.reshape(-1).contiguous().cpu()
    n, size = flat.numel(), flat.element_size()
    mask_t = flat != 0
    mask = mask_t.numpy()
    nnz = int(np.count_nonzero(mask))
    budget = n * size - OVERHEAD  # a sparse form must take fewer bytes than this
    costs = {"bitmask": (n + 7) // 8 + nnz * size}
    if min(costs["bitmask"], nnz * (1 + size)) >= budget:
        return None
    if nnz * (1 + size) < costs["bitmask"]:  # else no relative form can beat the bitmask
        pos = np.flatnonzero(mask)
        skips = np.diff(pos, prepend=-1) - 1
        for bits in GAP_DTYPES:
            costs[f"relative{bits}"] = (nnz + int((skips >> bits).sum())) * (bits // 8 + size)
    best = min(costs, key=costs.__getitem__)
    if costs[best] >= budget:
        return None
    entry = {"encoding": best, "shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch."),
             "nnz": nnz}
    values = flat[mask_t]
    if best == "bitmask":
        return entry, {"mask": torch.from_numpy(np.packbits(mask)), "values": values}
    bits = int(best.removeprefix("relative"))
    fillers = skips >> bits
    index = np.cumsum(fillers + 1) - 1  # where each non-zero sits among the entries
    count = nnz + int(fillers.sum())
    gaps = np.full(count, (1 << bits) - 1, dtype=GAP_DTYPES[bits])
    gaps[index] = skips & ((1 << bits) - 1)
    padded = torch.zeros(count, dtype=t.dtype)
    padded[torch.from_numpy(index)] = values
    entry.update(encoding="relative", index_bits=bits, entries=count)
    return entry, {"gaps": torch.from_numpy(gaps), "values": padded}


def decode_state(tensors: dict[str, torch.Tensor],
                 manifest: dict[str, Any]) -> dict[str, torch.Tensor]:
    if manifest.get("scheme") != "sparse" or manifest.get("version") != 1:
        raise ValueError(f"unsupported storage manifest {manifest.get('scheme')!r} "
                         f"version {manifest.get('version')!r}")
    entries = manifest.get("tensors", {})
    used = {f"{name}::{p}" for name in entries for p in ("mask", "values", "gaps")}
    out = {k: v for k, v in tensors.items() if k not in used}
    for name, entry in entries.items():
        try:
            out[name] = _decode_one(name, entry, tensors)
        except (KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"{name}: malformed or missing stored data ({exc!r})") from None
    return out


def _decode_one(name: str, entry: dict[str, Any], tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    def fail(why: str) -> ValueError:
        return ValueError(f"{name}: {why}")

    shape, dtype, encoding = entry["shape"], DTYPES.get(entry["dtype"]), entry["encoding"]
    if dtype is None or not all(isinstance(s, int) and s >= 0 for s in shape):
        raise fail(f"bad dtype {entry['dtype']!r} or shape {shape!r}")
    n = prod(shape)
    if encoding == "dense":
        t = tensors.get(name)
        if t is None or list(t.shape) != list(shape) or t.dtype != dtype:
            raise fail("dense tensor missing or not of the recorded shape and dtype")
        return t
    if encoding not in ("bitmask", "relative"):
        raise fail(f"unknown encoding {encoding!r}")
    nnz = entry["nnz"]
    values = tensors.get(f"{name}::values")
    if values is None or values.dtype != dtype or values.dim() != 1:
        raise fail(f"{name}::values missing or not a 1-D {entry['dtype']} tensor")
    out = torch.zeros(n, dtype=dtype)
    if encoding == "bitmask":
        mask = tensors.get(f"{name}::mask")
        if mask is None or mask.dtype != torch.uint8 or mask.shape != ((n + 7) // 8,):
            raise fail(f"{name}::mask missing or not {(n + 7) // 8} uint8 bytes for {n} elements")
        flags = np.unpackbits(mask.numpy())
        if flags[n:].any() or int(flags.sum()) != nnz or len(values) != nnz:
            raise fail(f"mask holds {int(flags.sum())} set bits and there are {len(values)} values, "
                       f"expected nnz={nnz} within {n} elements")
        out.masked_scatter_(torch.from_numpy(flags[:n].view(bool)), values)
        return out.reshape(shape)
    bits = entry["index_bits"]
    gaps = tensors.get(f"{name}::gaps")
    if bits not in GAP_DTYPES or gaps is None or gaps.dim() != 1 or \
            gaps.numpy().dtype != GAP_DTYPES[bits] or len(gaps) != len(values):
        raise fail(f"{name}::gaps missing or not {len(values)} uint{bits} gaps")
    pos = np.cumsum(gaps.numpy().astype(np.int64) + 1) - 1
    is_filler = (values == 0).numpy()
    if len(pos) and pos[-1] >= n:
        raise fail(f"gaps run past the {n} elements of shape {shape}")
    real = len(values) - int(is_filler.sum())
    if real != nnz or len(values) != entry.get("entries", len(values)) or \
            (gaps.numpy()[is_filler] != (1 << bits) - 1).any():
        raise fail(f"entries do not hold nnz={nnz} non-zeros plus well-formed fillers")
    out[torch.from_numpy(pos)] = values
    return out.reshape(shape)
