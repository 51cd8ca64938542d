"""How one tensor is coded inside a .scz archive (see archive.py for the container).

A tensor is coded from its bit patterns: the row-major flattened tensor viewed as unsigned
integers of its element size, little-endian. A "zero" is the all-zero bit pattern (so -0.0 is an
ordinary value), and every tensor comes back bit for bit. The smallest of these kinds is kept:

``raw``            part ``raw``: the bit patterns as bytes.
``sparse``         part ``gaps``: Huffman-coded (huffman.py) relative positions of the non-zero
                   patterns, escape-coded as in codebook.py (gap ``g < 255``: ``g`` zeros then a
                   value; 255: 255 zeros, no value); part ``values``: the non-zero patterns as bytes.
``shared``         part ``codebook``: the distinct patterns (at most 256, ascending) as bytes;
                   part ``indices``: Huffman-coded index into the codebook of every element.
``shared_sparse``  part ``gaps`` as in ``sparse``; part ``codebook``: the distinct non-zero
                   patterns; part ``indices``: Huffman-coded codebook index of each non-zero.

Byte parts (``raw``, ``values``, ``codebook``) are stored zlib-compressed when that is smaller;
the entry lists them under ``zlib``.
"""
from __future__ import annotations

import zlib
from math import prod
from typing import Any

import numpy as np
import torch

from . import huffman
from .codebook import ESCAPE, gap_positions, relative_gaps

MAX_VALUES = 256
DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int8, torch.int16, torch.int32,
    torch.int64, torch.uint8, torch.bool)}
_SIGNED = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_UNSIGNED = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
PART_OVERHEAD = 24  # rough header bytes per stored part (its JSON entry and section record)


def bit_patterns(t: torch.Tensor) -> np.ndarray:
    flat = t.detach().reshape(-1).contiguous().cpu()
    size = flat.element_size()
    return flat.view(_SIGNED[size]).numpy().view(_UNSIGNED[size])


def _le(u: np.ndarray) -> bytes:
    return u.astype(u.dtype.newbyteorder("<"), copy=False).tobytes()


def _distinct(u: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    if len(u) > 4096 and len(np.unique(u[:: max(1, len(u) // 4096)])) > MAX_VALUES:
        return None
    values, inverse = np.unique(u, return_inverse=True)
    return (values, inverse.reshape(-1)) if len(values) <= MAX_VALUES else None


def encode_tensor(t: torch.Tensor) -> tuple[dict[str, Any], dict[str, bytes]]:
    """(entry for the archive header, the tensor's parts as bytes), the smallest kind."""
    dtype = str(t.dtype).removeprefix("torch.")
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype} cannot be archived")
    u = bit_patterns(t)
    options: dict[str, dict[str, bytes]] = {"raw": {"raw": _le(u)}}
    mask = u != 0
    nnz = int(mask.sum())
    gaps = None
    if len(u) and nnz < len(u):
        gaps = huffman.encode(relative_gaps(mask, ESCAPE))
        options["sparse"] = {"gaps": gaps, "values": _le(u[mask])}
    got = _distinct(u)
    if got is not None:
        values, inverse = got
        options["shared"] = {"codebook": _le(values), "indices": huffman.encode(inverse)}
        if gaps is not None:
            nz = values != 0
            remap = np.cumsum(nz) - 1
            options["shared_sparse"] = {"gaps": gaps, "codebook": _le(values[nz]),
                                        "indices": huffman.encode(remap[inverse[mask]])}
    packed: dict[str, tuple[dict[str, bytes], list[str]]] = {}
    for kind, parts in options.items():
        squeezed, zipped = {}, []
        for name, data in parts.items():
            if name in ("raw", "values", "codebook"):
                z = zlib.compress(data, 9)
                if len(z) < len(data):
                    data, zipped = z, [*zipped, name]
            squeezed[name] = data
        packed[kind] = (squeezed, zipped)
    kind = min(packed, key=lambda k: sum(len(v) + PART_OVERHEAD for v in packed[k][0].values()))
    parts, zipped = packed[kind]
    entry = {"dtype": dtype, "shape": list(t.shape), "kind": kind, "nnz": nnz, "zlib": zipped}
    return entry, parts


def decode_tensor(entry: dict[str, Any], parts: dict[str, bytes]) -> torch.Tensor:
    """The tensor of ``entry``; ValueError saying what is wrong if the parts do not fit it."""
    dtype, shape, kind = DTYPES.get(entry.get("dtype")), entry.get("shape"), entry.get("kind")
    if dtype is None or not isinstance(shape, list) or not all(isinstance(s, int) and s >= 0 for s in shape):
        raise ValueError(f"bad dtype {entry.get('dtype')!r} or shape {shape!r}")
    n = prod(shape)
    size = torch.empty((), dtype=dtype).element_size()
    ut = np.dtype(_UNSIGNED[size]).newbyteorder("<")
    data = {}
    for name, blob in parts.items():
        if name in entry.get("zlib", []):
            try:
                blob = zlib.decompress(blob)
            except zlib.error as exc:
                raise ValueError(f"part {name}: {exc}") from None
        data[name] = blob

    def array(name: str, count: int | None = None) -> np.ndarray:
        blob = data[name]
        if len(blob) % size or (count is not None and len(blob) // size != count):
            raise ValueError(f"part {name} holds {len(blob)} bytes, not {count} values of {size} bytes")
        return np.frombuffer(blob, dtype=ut).astype(_UNSIGNED[size])

    if kind == "raw":
        u = array("raw", n)
    elif kind in ("sparse", "shared", "shared_sparse"):
        u = np.zeros(n, dtype=_UNSIGNED[size])
        if kind == "shared":
            book, idx = array("codebook"), huffman.decode(data["indices"])
            if len(idx) != n or (n and idx.max() >= len(book)):
                raise ValueError(f"{len(idx)} indices for {n} elements, or an index past the codebook")
            u = book[idx]
        else:
            pos = gap_positions(huffman.decode(data["gaps"]), n, ESCAPE)
            if len(pos) != entry.get("nnz"):
                raise ValueError(f"the gaps hold {len(pos)} non-zeros, the header says {entry.get('nnz')}")
            if kind == "sparse":
                u[pos] = array("values", len(pos))
            else:
                book, idx = array("codebook"), huffman.decode(data["indices"])
                if len(idx) != len(pos) or (len(idx) and idx.max() >= len(book)):
                    raise ValueError(f"{len(idx)} indices for {len(pos)} non-zeros, or an index past the codebook")
                u[pos] = book[idx]
    else:
        raise ValueError(f"unknown kind {kind!r}")
    out = torch.from_numpy(u.view(np.dtype(f"i{size}")).copy() if size > 1 else u.copy())
    return out.view(dtype).reshape(shape)
