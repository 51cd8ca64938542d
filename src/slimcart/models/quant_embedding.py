"""Row-wise quantized embedding tables: packed low-bit codes, dequantized at lookup.

``QuantEmbedding(rows, dim, bits, scale_dtype)`` stands in for ``nn.Embedding(rows, dim)``
(int ids in, float vectors out). Its buffers:

- ``codes`` (uint8): each row's ``bits``-bit codes packed low bits first (2 per byte at 4 bits,
  4 per byte at 2 bits), one row per line of ``ceil(dim * bits / 8)`` bytes. A 1-wide table
  (DeepFM's first-order weights) packs several rows into a byte instead.
- per-row parameters, by ``scale_dtype``: ``float32`` / ``float16``: ``scale`` and ``bias`` per
  row, ``w = q * scale + bias`` (asymmetric, 8 / 4 bytes a row); ``log8``: one byte per row,
  ``scale_code`` k in 1..255, picks one of 255 log-spaced scales of the table,
  ``scale = exp(scale_log[0] + k * scale_log[1])`` (8 bytes a table stored), and the codes are
  symmetric, ``w = (q - z) * scale`` with ``z = 2**(bits-1) - 1/2`` (1 byte a row). A 1-wide
  table has one fp32 scale and bias for the whole table (per-row parameters would cost more
  than the value).

Hot rows (mixed precision): ``hot_rows`` rows are kept in a wider table (``hot_bits`` 8 / 4 with
fp32 scale and bias per row, or 32: the float rows). No per-row map is stored: a hot row's
scale is negative (``scale = -1``; with log8 ``scale_code = 0``, whose grid entry is -1), and its own
code line, unused otherwise, holds its index into the hot table (little endian).

A row-pruned table (``CompactEmbedding``) keeps its id map: ``num_ids`` ids go through the
int32 ``id_map`` (its own, or ``map_from``'s) to the quantized rows.

The forward is plain ONNX: Gather of the code lines, Gather of a 256-entry uint8 unpack table,
Cast, Mul, Add; per-row parameters (and log8's 256-entry scale grid) are read with GatherElements,
so that ONNX Runtime's dynamic quantizer (which rewrites Gather over float tables) leaves them alone.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ..errors import ModelError
from .compact_embedding import CompactEmbedding

BITS = (8, 4, 2)
HOT_BITS = (8, 4, 32)
SCALE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "log8": None}
_REFINE = 4       # least-squares refinements of each row's scale (and bias) with search="mse"
_CHUNK = 1 << 20  # elements per chunk while fitting


def layout(rows: int, dim: int, bits: int) -> tuple[int, int]:
    """(rows per byte, bytes per row line) of the packed codes."""
    if dim * bits < 8 and 8 % (dim * bits) == 0:
        return 8 // (dim * bits), 1
    return 1, math.ceil(dim * bits / 8)


def _unpack_table(bits: int) -> torch.Tensor:
    """uint8 [256, 8 // bits]: the codes packed in each byte value."""
    per = 8 // bits
    byte = torch.arange(256, dtype=torch.int64)[:, None]
    return ((byte >> (torch.arange(per) * bits)) & (2 ** bits - 1)).to(torch.uint8)


def pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes [rows, dim] (values < 2**bits) -> the packed ``codes`` buffer."""
    rows, dim = q.shape
    group, nb = layout(rows, dim, bits)
    per = 8 // bits
    shifts = torch.arange(per, dtype=torch.int64) * bits
    if group > 1:
        flat = torch.zeros(math.ceil(rows / group) * per, dtype=torch.int64)
        flat[:rows * dim] = q.reshape(-1).long()
        return (flat.view(-1, per) << shifts).sum(1).to(torch.uint8)
    padded = torch.zeros(rows, nb * per, dtype=torch.int64)
    padded[:, :dim] = q.long()
    return (padded.view(rows, nb, per) << shifts).sum(2).to(torch.uint8)


class QuantEmbedding(nn.Module):
    """``nn.Embedding(rows, dim)`` with packed ``bits``-bit rows (see the module doc); build one
    with ``from_float``, or empty with the same arguments and load a state dict into it."""

    def __init__(self, rows: int, dim: int, bits: int = 4, scale_dtype: str = "float16", *,
                 hot_rows: int = 0, hot_bits: int = 8, num_ids: int | None = None,
                 map_from: nn.Module | None = None):
        super().__init__()
        if bits not in BITS:
            raise ValueError(f"bits must be one of {BITS}, got {bits!r}")
        if scale_dtype not in SCALE_DTYPES:
            raise ValueError(f"scale_dtype must be one of {list(SCALE_DTYPES)}, got {scale_dtype!r}")
        self.rows, self.dim, self.bits, self.scale_dtype = rows, dim, bits, scale_dtype
        self.per_row = dim > 1
        self.group, self.line_bytes = layout(rows, dim, bits)
        self.hot_rows, self.hot_bits = int(hot_rows), int(hot_bits)
        self.index_bytes = max(1, math.ceil(math.log2(max(self.hot_rows, 2)) / 8))
        if self.hot_rows:
            if hot_bits not in HOT_BITS or hot_bits <= bits:
                raise ValueError(f"hot_bits must be one of {HOT_BITS} and wider than bits={bits}")
            if not self.per_row or self.group > 1 or self.index_bytes > self.line_bytes \
                    or self.hot_rows > rows:
                raise ValueError(f"a {rows} x {dim} table at {bits} bits cannot hold {hot_rows} hot "
                                 "rows (1-wide tables have none; a row's code bytes hold the hot index)")
        lines = math.ceil(rows / self.group)
        self.register_buffer("codes", torch.zeros((lines,) if self.group > 1 else (lines, self.line_bytes),
                                                  dtype=torch.uint8))
        self.register_buffer("unpack", _unpack_table(bits), persistent=False)
        n = rows if self.per_row else 1
        if not self.per_row or scale_dtype != "log8":
            dtype = SCALE_DTYPES[scale_dtype] if self.per_row else torch.float32
            self.register_buffer("scale", torch.zeros(n, dtype=dtype))
            self.register_buffer("bias", torch.zeros(n, dtype=dtype))
        else:
            self.register_buffer("scale_code", torch.zeros(n, dtype=torch.uint8))
            self.register_buffer("scale_log", torch.zeros(2))
            self.register_buffer("scale_grid", log8_grid(self.scale_log), persistent=False)
        if self.hot_rows and hot_bits == 32:
            self.register_buffer("hot_weight", torch.zeros(self.hot_rows, dim))
        elif self.hot_rows:
            self.register_buffer("hot_codes", torch.zeros(self.hot_rows, layout(1, dim, hot_bits)[1],
                                                          dtype=torch.uint8))
            self.register_buffer("hot_scale", torch.zeros(self.hot_rows))
            self.register_buffer("hot_bias", torch.zeros(self.hot_rows))
            self.register_buffer("hot_unpack", _unpack_table(hot_bits), persistent=False)
        self.num_ids = num_ids
        if num_ids is not None and map_from is None:
            self.register_buffer("id_map", torch.zeros(num_ids, dtype=torch.int32))
        object.__setattr__(self, "_map_from", map_from)  # a plain attribute: the map is saved once

    # ---- lookup ------------------------------------------------------------------------
    def mapping(self) -> torch.Tensor:
        return self._map_from.id_map if self._map_from is not None else self.id_map

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids if ids.dim() == 1 else ids.reshape(-1)
        if self.num_ids is not None:
            flat = self.mapping().index_select(0, flat).long()
        out = self.lookup(flat)
        return out if ids.dim() == 1 else out.reshape(ids.shape + (self.dim,))

    def lookup(self, rows: torch.Tensor) -> torch.Tensor:
        """Float vectors [n, dim] of the rows ``rows`` (int64 [n])."""
        if self.group > 1:  # several rows per byte
            line = rows // self.group
            byte = self.codes.index_select(0, line).long()
            first = byte * (8 // self.bits) + (rows - line * self.group) * self.dim
            q = self.unpack.reshape(-1)[first.unsqueeze(1) + torch.arange(self.dim)]
            lines = None
        else:
            lines = self.codes.index_select(0, rows)
            q = lines if self.bits == 8 else self._unpack(self.unpack, lines)
        scale, bias = self._row_params(rows)
        out = q.float() * scale + bias
        if self.hot_rows:
            hot = scale < 0
            weights = torch.tensor([256 ** i for i in range(self.index_bytes)], dtype=torch.int64)
            index = (lines[:, :self.index_bytes].long() * weights).sum(1, keepdim=True)
            index = torch.where(hot, index, torch.zeros_like(index)).reshape(-1)
            out = torch.where(hot, self._hot_lookup(index), out)
        return out

    def _unpack(self, table: torch.Tensor, lines: torch.Tensor) -> torch.Tensor:
        """Code lines [n, bytes] -> codes [n, dim] through a byte -> codes table."""
        q = table.index_select(0, lines.reshape(-1).long()).reshape(lines.shape[0], -1)
        return q if q.shape[1] == self.dim else q[:, :self.dim]

    def _row_params(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.per_row:
            return self.scale, self.bias
        if self.scale_dtype == "log8":
            code = torch.gather(self.scale_code, 0, rows).long()
            scale = torch.gather(self.scale_grid, 0, code).unsqueeze(1)
            return scale, scale * -(2 ** (self.bits - 1) - 0.5)
        return (torch.gather(self.scale, 0, rows).float().unsqueeze(1),
                torch.gather(self.bias, 0, rows).float().unsqueeze(1))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if hasattr(self, "scale_grid"):  # derived from the loaded scale_log
            self.scale_grid.copy_(log8_grid(self.scale_log))

    def _hot_lookup(self, index: torch.Tensor) -> torch.Tensor:
        if self.hot_bits == 32:
            return self.hot_weight.index_select(0, index)
        lines = self.hot_codes.index_select(0, index)
        q = lines if self.hot_bits == 8 else self._unpack(self.hot_unpack, lines)
        return (q.float() * torch.gather(self.hot_scale, 0, index).unsqueeze(1)
                + torch.gather(self.hot_bias, 0, index).unsqueeze(1))

    def dequantize(self) -> torch.Tensor:
        """The float table [rows, dim], computed exactly as ``forward`` computes each row."""
        step = max(1, _CHUNK // self.dim)
        with torch.no_grad():
            return torch.cat([self.lookup(torch.arange(s, min(s + step, self.rows)))
                              for s in range(0, self.rows, step)])

    @staticmethod
    def hot_capacity(rows: int, dim: int, bits: int) -> int:
        """The most hot rows a ``rows`` x ``dim`` table at ``bits`` can index (0: none)."""
        group, line_bytes = layout(rows, dim, bits)
        return 0 if dim < 2 or group > 1 else min(rows, 256 ** line_bytes)

    def record(self) -> dict[str, Any]:
        """The constructor arguments a saved model needs (``apply_embedding_quant``)."""
        return {"rows": self.rows, "dim": self.dim, "bits": self.bits, "scale_dtype": self.scale_dtype,
                "hot_rows": self.hot_rows, "hot_bits": self.hot_bits}

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.state_dict().values())

    def extra_repr(self) -> str:
        text = f"{self.rows}, {self.dim}, int{self.bits}, scales {self.scale_dtype if self.per_row else 'per table'}"
        if self.hot_rows:
            text += f", {self.hot_rows} hot rows at {self.hot_bits} bits"
        return text + (f", {self.num_ids} ids via id map" if self.num_ids is not None else "")

    # ---- quantization ------------------------------------------------------------------
    @classmethod
    def from_float(cls, weight: torch.Tensor, bits: int = 4, scale_dtype: str = "float16", *,
                   search: str = "mse", hot_ids: torch.Tensor | None = None, hot_bits: int = 8,
                   num_ids: int | None = None, map_from: nn.Module | None = None) -> "QuantEmbedding":
        """Quantize a float table [rows, dim]; ``hot_ids``: rows kept at ``hot_bits``."""
        w = weight.detach().float().cpu()
        hot = torch.unique(torch.as_tensor(hot_ids if hot_ids is not None else [], dtype=torch.int64))
        mod = cls(*w.shape, bits, scale_dtype, hot_rows=len(hot), hot_bits=hot_bits, num_ids=num_ids,
                  map_from=map_from)
        if not mod.per_row:
            q, scale, bias = fit_affine(w.reshape(1, -1), bits, torch.float32, search)
            q = q.reshape(w.shape)
        elif scale_dtype == "log8":
            q, code, scale_log = fit_log8(w, bits, search)
            mod.scale_code.copy_(code), mod.scale_log.copy_(scale_log)
            mod.scale_grid.copy_(log8_grid(scale_log))
            mod.scale_code[hot] = 0
        else:
            q, scale, bias = fit_affine(w, bits, SCALE_DTYPES[scale_dtype], search)
            scale[hot], bias[hot] = -1.0, 0.0
        if scale_dtype != "log8" or not mod.per_row:
            mod.scale.copy_(scale), mod.bias.copy_(bias)
        codes = pack(q, bits)
        if len(hot):  # a hot row's code line holds its index into the hot table
            index = torch.arange(len(hot))
            codes[hot] = 0
            codes[hot, :mod.index_bytes] = torch.stack(
                [(index >> (8 * i)) & 255 for i in range(mod.index_bytes)], 1).to(torch.uint8)
            if hot_bits == 32:
                mod.hot_weight.copy_(w[hot])
            else:
                hq, hs, hb = fit_affine(w[hot], hot_bits, torch.float32, search)
                mod.hot_codes.copy_(pack(hq, hot_bits)), mod.hot_scale.copy_(hs), mod.hot_bias.copy_(hb)
        mod.codes.copy_(codes)
        return mod


def _keep(best: list | None, err: torch.Tensor, *values: torch.Tensor) -> list:
    """Per row, the candidate of least error so far: [err, *values]."""
    if best is None:
        return [err, *values]
    better = err < best[0]
    return [torch.where(better, err, best[0])] + [
        torch.where(better.reshape(-1, *[1] * (v.dim() - 1)), v, old) for v, old in zip(values, best[1:])]


def fit_affine(w: torch.Tensor, bits: int, dtype: torch.dtype, search: str):
    """Per row of ``w``: codes, scale and bias (in ``dtype``) with ``w ~ q * scale + bias``.
    ``minmax``: the row's range. ``mse``: then ``_REFINE`` times the least-squares scale and
    bias for the current codes, re-quantized; each row keeps its candidate of least error."""
    top = 2 ** bits - 1
    qs, scales, biases = [], [], []
    step = max(1, _CHUNK // w.shape[1])
    for s in range(0, w.shape[0], step):
        x = w[s:s + step].float()
        lo, hi = x.amin(1, keepdim=True), x.amax(1, keepdim=True)
        scale, bias, best = (hi - lo) / top, lo, None
        for _ in range(1 + (_REFINE if search == "mse" else 0)):
            scale, bias = scale.to(dtype), bias.to(dtype)
            if not (torch.isfinite(scale).all() and torch.isfinite(bias).all()):
                raise ModelError(f"an embedding row's range does not fit in {dtype}.",
                                 "Use scale_dtype float32 for this table.")
            sf, bf = scale.float(), bias.float()
            q = torch.clamp(torch.round((x - bf) / torch.where(sf > 0, sf, 1.0)), 0, top)
            best = _keep(best, (q * sf + bf - x).pow(2).sum(1), q, scale[:, 0], bias[:, 0])
            qm, xm = q.mean(1, keepdim=True), x.mean(1, keepdim=True)
            var = (q - qm).pow(2).sum(1, keepdim=True)
            fit = ((q - qm) * (x - xm)).sum(1, keepdim=True) / torch.where(var > 0, var, 1.0)
            ok = (var > 0) & (fit > 0)
            scale, bias = torch.where(ok, fit, sf), torch.where(ok, xm - fit * qm, bf)
        qs.append(best[1].to(torch.uint8)), scales.append(best[2]), biases.append(best[3])
    return torch.cat(qs), torch.cat(scales), torch.cat(biases)


def log8_grid(scale_log: torch.Tensor) -> torch.Tensor:
    """The 256 scales log8 codes read: ``exp(scale_log[0] + k * scale_log[1])``; entry 0 is -1,
    the hot-row flag. Computed once (not stored in the state dict): transcendental ops at lookup
    were erratic in PyTorch eager here (exp of 256 floats took 2 us or 30 ms by thread state)."""
    grid = torch.exp(scale_log[0].double() + torch.arange(256, dtype=torch.float64) * scale_log[1].double())
    grid[0] = -1.0
    return grid.float()


def fit_log8(w: torch.Tensor, bits: int, search: str):
    """Symmetric codes, ``w ~ (q - z) * scale``, and a per-row scale code k in 1..255 on a log
    grid spanning the table's row scales. ``minmax``: the smallest grid scale that clips nothing;
    ``mse``: then the grid scale nearest the least-squares scale, ``_REFINE`` times.
    Returns (codes, scale code per row, ``scale_log``)."""
    top, zero = 2 ** bits - 1, 2 ** (bits - 1) - 0.5
    ideal = w.abs().amax(1).float() / zero
    positive = ideal[ideal > 0]
    lo, hi = (float(positive.min()), float(positive.max())) if len(positive) else (1.0, 1.0)
    lo = lo / 2 if search == "mse" else lo   # least-squares scales fall below the no-clip ones
    step = math.log(hi / lo) / 254 if hi > lo else 1e-3
    scale_log = torch.tensor([math.log(lo) - step, step], dtype=torch.float32)
    grid = log8_grid(scale_log)

    def code_of(scale: torch.Tensor, rounding) -> torch.Tensor:
        k = rounding((torch.log(torch.clamp(scale.double(), min=lo)) - math.log(lo)) / step)
        return torch.clamp(k, 0, 254).long() + 1

    qs, codes = [], []
    rows_step = max(1, _CHUNK // w.shape[1])
    for s in range(0, w.shape[0], rows_step):
        x = w[s:s + rows_step].float()
        k, best = code_of(ideal[s:s + rows_step], lambda v: torch.ceil(v - 1e-4)), None
        for _ in range(1 + (_REFINE if search == "mse" else 0)):
            scale = grid[k].unsqueeze(1)
            q = torch.clamp(torch.round(x / scale + zero), 0, top)
            best = _keep(best, (q * scale + scale * -zero - x).pow(2).sum(1), q, k)
            c = q - zero
            k = code_of((x * c).sum(1) / c.pow(2).sum(1), torch.round)
        qs.append(best[1].to(torch.uint8)), codes.append(best[2].to(torch.uint8))
    return torch.cat(qs), torch.cat(codes), scale_log


# ---- model surgery ------------------------------------------------------------------------

def replace_table(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` at ``name``; tables that read the old module's id map read the new one's."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = parent.get_submodule(child)
    parent._modules[child] = new
    for mod in model.modules():
        if getattr(mod, "_map_from", None) is old:
            object.__setattr__(mod, "_map_from", new)


def table_source(mod: nn.Module) -> tuple[torch.Tensor, dict[str, Any]]:
    """(float weight, id-map keywords for QuantEmbedding) of an nn.Embedding / CompactEmbedding."""
    if isinstance(mod, CompactEmbedding):
        return mod.weight, {"num_ids": mod.num_ids, "map_from": mod._map_from}
    if isinstance(mod, nn.Embedding):
        return mod.weight, {}
    raise TypeError(f"{type(mod).__name__} is not an nn.Embedding or CompactEmbedding")


def apply_embedding_quant(model: nn.Module, record: dict[str, Any]) -> nn.Module:
    """Give a freshly built model the quantized tables of ``record`` (weights load afterwards)."""
    for entry in record.get("tables", []):
        name = entry["name"]
        try:
            old = model.get_submodule(name)
            weight, keys = table_source(old)
        except (AttributeError, TypeError) as exc:
            raise ModelError(f"embedding_quant names table {name!r}, which the model does not have "
                             f"as an embedding table ({exc}).") from None
        if tuple(weight.shape) != (entry["rows"], entry["dim"]):
            raise ModelError(f"embedding_quant table {name!r}: expected {entry['rows']} x "
                             f"{entry['dim']}, the model has {tuple(weight.shape)}.")
        try:
            new = QuantEmbedding(entry["rows"], entry["dim"], entry["bits"], entry["scale_dtype"],
                                 hot_rows=entry.get("hot_rows", 0), hot_bits=entry.get("hot_bits", 8), **keys)
        except (KeyError, ValueError) as exc:
            raise ModelError(f"embedding_quant table {name!r}: the saved record is invalid: {exc}") from None
        replace_table(model, name, new)
    return model
