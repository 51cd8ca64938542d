"""Linear layers whose weights are stored weight-only quantized: 8 or 4 bits per weight (two
4-bit codes per byte), one float32 scale per group of ``group_size`` input columns of each
output row, dequantized at every forward (activations stay float).

Codes are unsigned: ``w = (code - zero) * scale``. Symmetric groups use the fixed zero
``2**(bits-1)`` and codes in ``[1, 2**bits - 1]``; asymmetric groups store a uint8 zero per
group. A row whose length is not a multiple of the group size is padded with zero weights; a row
shorter than a group is a single group.
The spec record ``{"bits", "group_size", "symmetric", "layers"}`` rebuilds the modules so that
a saved state dict (codes, scales, zeros, bias) loads strictly.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import ModelError

BITS = (4, 8)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes in [0, 15], last dim even -> half as many bytes (even column in the low nibble)."""
    if codes.shape[-1] % 2:
        raise ValueError("pack_int4 needs an even number of columns")
    c = codes.to(torch.uint8)
    return c[..., 0::2] | (c[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of ``pack_int4``: uint8 codes with bitwise ops in eager PyTorch; during ONNX export,
    int32 codes with arithmetic only (Div/Sub export at opset 13+, BitwiseAnd needs opset 18)."""
    if torch.onnx.is_in_onnx_export():
        p = packed.to(torch.int32)
        hi = torch.div(p, 16, rounding_mode="trunc")
        return torch.stack((p - hi * 16, hi), dim=-1).flatten(-2)
    out = torch.empty(*packed.shape[:-1], packed.shape[-1] * 2, dtype=torch.uint8, device=packed.device)
    out[..., 0::2] = packed & 0x0F
    out[..., 1::2] = packed >> 4
    return out


def quantize_groups(weight: torch.Tensor, bits: int, group_size: int, symmetric: bool
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``weight`` [N, K] -> (codes uint8 [N, Kp], scales float32 [N, G], zeros uint8 [N, G] or None)
    with ``Kp = G * group_size`` (rows padded with zeros)."""
    if bits not in BITS:
        raise ValueError(f"bits must be one of {BITS}, got {bits}")
    w = weight.detach().float()
    n, k = w.shape
    groups = -(-k // group_size)
    w = torch.nn.functional.pad(w, (0, groups * group_size - k)).view(n, groups, group_size)
    top = 2 ** bits - 1
    if symmetric:
        half = 2 ** (bits - 1)
        scale = w.abs().amax(-1) / (half - 1)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        codes = torch.round(w / scale[..., None]).clamp(1 - half, half - 1) + half
        zeros = None
    else:
        lo, hi = w.amin(-1).clamp(max=0), w.amax(-1).clamp(min=0)
        scale = (hi - lo) / top
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        zero = torch.round(-lo / scale).clamp(0, top)
        codes = (torch.round(w / scale[..., None]) + zero[..., None]).clamp(0, top)
        zeros = zero.to(torch.uint8)
    return codes.to(torch.uint8).view(n, -1), scale.contiguous(), zeros


class WeightOnlyLinear(nn.Module):
    """``y = x @ dequantize().T + bias`` with the weight held as packed codes and group scales."""

    def __init__(self, in_features: int, out_features: int, bias: bool, bits: int, group_size: int,
                 symmetric: bool = True):
        super().__init__()
        if bits not in BITS:
            raise ValueError(f"bits must be one of {BITS}, got {bits}")
        if group_size < 2 or group_size % 2:
            raise ValueError(f"group_size must be an even number >= 2, got {group_size}")
        self.in_features, self.out_features = in_features, out_features
        # a row shorter than a group is one group (no padding beyond an even length)
        group_size = min(group_size, in_features + in_features % 2)
        self.bits, self.group_size, self.symmetric = bits, group_size, symmetric
        groups = -(-in_features // group_size)
        width = groups * group_size * bits // 8
        self.register_buffer("codes", torch.zeros(out_features, width, dtype=torch.uint8))
        self.register_buffer("scales", torch.ones(out_features, groups))
        self.register_buffer("zeros", None if symmetric else torch.zeros(out_features, groups, dtype=torch.uint8))
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int, group_size: int, symmetric: bool = True
                    ) -> "WeightOnlyLinear":
        mod = cls(linear.in_features, linear.out_features, linear.bias is not None, bits, group_size, symmetric)
        codes, scales, zeros = quantize_groups(linear.weight, bits, mod.group_size, symmetric)
        with torch.no_grad():
            mod.codes.copy_(pack_int4(codes) if bits == 4 else codes)
            mod.scales.copy_(scales)
            if zeros is not None:
                mod.zeros.copy_(zeros)
            if linear.bias is not None:
                mod.bias.copy_(linear.bias.detach().float())
        return mod

    def unpacked_codes(self) -> torch.Tensor:
        return unpack_int4(self.codes) if self.bits == 4 else self.codes

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight [out_features, in_features] the codes stand for."""
        n, groups = self.scales.shape
        codes = self.unpacked_codes().to(dtype).view(n, groups, self.group_size)
        zero = self.zeros.to(dtype)[..., None] if self.zeros is not None else float(2 ** (self.bits - 1))
        w = (codes - zero) * self.scales.to(dtype)[..., None]
        return w.view(n, -1)[:, :self.in_features]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return nn.functional.linear(x, self.dequantize(x.dtype), bias)

    def stored_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scales, self.zeros, self.bias)
                   if t is not None)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, symmetric={self.symmetric}")


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent, _, leaf = name.rpartition(".")
    return (model.get_submodule(parent) if parent else model), leaf


def replace_linear(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, leaf = _parent(model, name)
    setattr(parent, leaf, new)


def apply_weight_only(model: nn.Module, record: dict[str, Any]) -> nn.Module:
    """Replace each Linear named in ``record["layers"]`` by an empty WeightOnlyLinear of the same
    shape (the saved codes and scales are loaded afterwards)."""
    for name in record["layers"]:
        try:
            lin = model.get_submodule(name)
        except AttributeError:
            lin = None
        if not isinstance(lin, nn.Linear):
            raise ModelError(f"weight_only record names layer {name!r}, which is not a Linear layer of "
                             "this architecture.", "The model folder's slimcart.json does not match its weights.")
        replace_linear(model, name, WeightOnlyLinear(lin.in_features, lin.out_features, lin.bias is not None,
                                                     int(record["bits"]), int(record["group_size"]),
                                                     bool(record.get("symmetric", True))))
    return model
