"""How one tensor is coded inside a .scz archive (see archive.py for the container).

A tensor is coded from its bit patterns: the row-major flattened tensor viewed as unsigned
integers of its element size, little-endian. A "zero" is the all-zero bit pattern (so -0.0 is an
ordinary value), and every tensor comes back bit for bit. The smallest of these kinds is kept:

``raw``            part ``raw``: the bit patterns as bytes.
``sparse``         part ``gaps``: Huffman-coded (huffman.py) relative positions of the non-zero
                   patterns, escape-coded as in codebook.py with the tensor's own bound ``E`` (the
                   entry's ``escape``, 255 when absent; gap ``g < E``: ``g`` zeros then a value;
                   ``E``: ``E`` zeros, no value), ``E`` chosen per tensor from 15, 31, 63, 127, 255
                   as the smallest coding, as Deep Compression bounds its index differences per
                   layer; part ``values``: the non-zero patterns as bytes.
``shared``         part ``codebook``: the distinct patterns (at most 256, ascending) as bytes;
                   part ``indices``: Huffman-coded index into the codebook of every element.
``shared_sparse``  part ``gaps`` as in ``sparse``; part ``codebook``: the distinct non-zero
                   patterns; part ``indices``: Huffman-coded codebook index of each non-zero.

Byte parts (``raw``, ``values``, ``codebook``) of a float32 tensor whose every value converts to
float16 (else bfloat16) and back bit for bit are stored in that half format, listed under the
entry's ``half`` as ``{part: "float16" | "bfloat16"}`` (weight sharing rounds its centroids to
float16 for this). Byte parts are then stored zlib-compressed when that is smaller; the entry
lists them under ``zlib``.
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
ESCAPES = (15, 31, 63, 127, ESCAPE)


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


def _halve(u: np.ndarray) -> tuple[bytes, str] | None:
    """float32 bit patterns as float16 (else bfloat16) bytes when that conversion is exact."""
    if u.dtype != np.uint32 or not len(u):
        return None
    f = u.view(np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        h = f.astype(np.float16)
    if np.array_equal(h.astype(np.float32).view(np.uint32), u):
        return _le(h.view(np.uint16)), "float16"
    if not np.any(u & 0xFFFF):  # bfloat16 is the upper half of a float32
        return _le((u >> 16).astype(np.uint16)), "bfloat16"
    return None


def _unhalve(blob: bytes, kind: str) -> bytes:
    if kind == "float16":
        return _le(np.frombuffer(blob, dtype="<f2").astype(np.float32).view(np.uint32))
    if kind == "bfloat16":
        return _le(np.frombuffer(blob, dtype="<u2").astype(np.uint32) << 16)
    raise ValueError(f"unknown half format {kind!r}")


def _best_gaps(mask: np.ndarray) -> tuple[bytes, int]:
    coded = [(huffman.encode(relative_gaps(mask, e)), e) for e in ESCAPES]
    return min(coded, key=lambda c: len(c[0]))


def encode_tensor(t: torch.Tensor) -> tuple[dict[str, Any], dict[str, bytes]]:
    """(entry for the archive header, the tensor's parts as bytes), the smallest kind."""
    dtype = str(t.dtype).removeprefix("torch.")
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype} cannot be archived")
    u = bit_patterns(t)
    # byte parts stay arrays of bit patterns until packed (half precision, zlib); Huffman parts are bytes
    options: dict[str, dict[str, np.ndarray | bytes]] = {"raw": {"raw": u}}
    mask = u != 0
    nnz = int(mask.sum())
    gaps, escape = None, ESCAPE
    if len(u) and nnz < len(u):
        gaps, escape = _best_gaps(mask)
        options["sparse"] = {"gaps": gaps, "values": u[mask]}
    got = _distinct(u)
    if got is not None:
        values, inverse = got
        options["shared"] = {"codebook": values, "indices": huffman.encode(inverse)}
        if gaps is not None:
            nz = values != 0
            remap = np.cumsum(nz) - 1
            options["shared_sparse"] = {"gaps": gaps, "codebook": values[nz],
                                        "indices": huffman.encode(remap[inverse[mask]])}
    packed: dict[str, tuple[dict[str, bytes], list[str], dict[str, str]]] = {}
    for kind, parts in options.items():
        squeezed, zipped, halved = {}, [], {}
        for name, data in parts.items():
            if isinstance(data, np.ndarray):
                half = _halve(data) if dtype == "float32" else None
                if half is not None:
                    data, halved[name] = half
                else:
                    data = _le(data)
                z = zlib.compress(data, 9)
                if len(z) < len(data):
                    data, zipped = z, [*zipped, name]
            squeezed[name] = data
        packed[kind] = (squeezed, zipped, halved)
    kind = min(packed, key=lambda k: sum(len(v) + PART_OVERHEAD for v in packed[k][0].values()))
    parts, zipped, halved = packed[kind]
    entry: dict[str, Any] = {"dtype": dtype, "shape": list(t.shape), "kind": kind, "nnz": nnz, "zlib": zipped}
    if halved:
        entry["half"] = halved
    if "gaps" in parts and escape != ESCAPE:
        entry["escape"] = escape
    return entry, parts


def decode_tensor(entry: dict[str, Any], parts: dict[str, bytes]) -> torch.Tensor:
    """The tensor of ``entry``; ValueError saying what is wrong if the parts do not fit it."""
    dtype, shape, kind = DTYPES.get(entry.get("dtype")), entry.get("shape"), entry.get("kind")
    if dtype is None or not isinstance(shape, list) or not all(isinstance(s, int) and s >= 0 for s in shape):
        raise ValueError(f"bad dtype {entry.get('dtype')!r} or shape {shape!r}")
    n = prod(shape)
    size = torch.empty((), dtype=dtype).element_size()
    ut = np.dtype(_UNSIGNED[size]).newbyteorder("<")
    halves = entry.get("half", {})
    if not isinstance(halves, dict):
        raise ValueError(f"bad half entry {halves!r}")
    data = {}
    for name, blob in parts.items():
        if name in entry.get("zlib", []):
            try:
                blob = zlib.decompress(blob)
            except zlib.error as exc:
                raise ValueError(f"part {name}: {exc}") from None
        if name in halves:
            if entry.get("dtype") != "float32":
                raise ValueError(f"part {name} is stored as half floats but the tensor is {entry.get('dtype')}")
            if len(blob) % 2:
                raise ValueError(f"part {name} holds {len(blob)} bytes, not a whole number of half floats")
            blob = _unhalve(blob, halves[name])
        data[name] = blob
    escape = entry.get("escape", ESCAPE)
    if not isinstance(escape, int) or not 1 <= escape <= ESCAPE:
        raise ValueError(f"bad gap escape {escape!r}")

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
            pos = gap_positions(huffman.decode(data["gaps"]), n, escape)
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
