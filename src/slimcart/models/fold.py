"""BatchNorm folded into the preceding Conv/Linear, as JSON, so a saved folded model rebuilds.

``spec["bn_folded"]`` (written by the ``fold_bn`` technique)::

    {"version": 1,
     "pairs": [["stem.0", "stem.1"], ["layers.0.conv1", "layers.0.bn1"]],   # [conv or linear, batchnorm]
     "inplace_relu": ["layers.0.relu"]}                                     # ReLUs switched to inplace

``apply_folding(model, record)`` gives each listed Conv/Linear a bias (zeros, if it had none) and
replaces each listed BatchNorm with what is left of it once folded: ``nn.Identity``, or for
timm's ``BatchNormAct2d`` its dropout and activation (``FoldedBatchNormAct``). The folded weights
are then loaded from the saved state dict.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import ModelError

VERSION = 1


class FoldedBatchNormAct(nn.Module):
    """What remains of timm's BatchNormAct2d once its normalisation is folded: drop, then act
    (the attribute names are kept, so the state-dict keys of the activation do not change)."""

    def __init__(self, drop: nn.Module, act: nn.Module):
        super().__init__()
        self.drop, self.act = drop, act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(x))


def has_act(bn: nn.Module) -> bool:
    """timm's BatchNormAct2d and its kin: a BatchNorm followed by its own dropout and activation."""
    return isinstance(getattr(bn, "act", None), nn.Module) and isinstance(getattr(bn, "drop", None), nn.Module)


def remainder(bn: nn.Module) -> nn.Module:
    """The module that replaces a folded BatchNorm."""
    return FoldedBatchNormAct(bn.drop, bn.act) if has_act(bn) else nn.Identity()


def out_features(layer: nn.Module) -> int:
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels


def _get(model: nn.Module, name: str, want: tuple[type, ...], what: str) -> nn.Module:
    try:
        mod = model.get_submodule(name)
    except AttributeError:
        mod = None
    if not isinstance(mod, want):
        raise ModelError(f"bn_folded: the model has no {what} {name!r} (found "
                         f"{type(mod).__name__ if mod is not None else 'nothing'}); the saved folding "
                         "record does not fit this architecture.", "Save the model again with `slimcart compress`.")
    return mod


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def add_bias(layer: nn.Module) -> None:
    """Give a Conv/Linear a zero bias if it has none (a folded layer always has one)."""
    if layer.bias is None:
        layer.bias = nn.Parameter(layer.weight.new_zeros(out_features(layer)))


def record_problem(record: Any) -> str | None:
    if not isinstance(record, dict) or record.get("version") != VERSION:
        return f"expected a mapping with version {VERSION}"
    pairs = record.get("pairs")
    if not isinstance(pairs, list) or not all(
            isinstance(p, list) and len(p) == 2 and all(isinstance(n, str) and n for n in p) for p in pairs):
        return "'pairs' must be a list of [layer name, batchnorm name]"
    relu = record.get("inplace_relu", [])
    if not isinstance(relu, list) or not all(isinstance(n, str) for n in relu):
        return "'inplace_relu' must be a list of module names"
    return None


def apply_folding(model: nn.Module, record: dict[str, Any]) -> nn.Module:
    """Give the model the structure of its folded version (weights are loaded afterwards)."""
    if problem := record_problem(record):
        raise ModelError(f"bn_folded: the saved record is damaged: {problem}.",
                         "Save the model again with `slimcart compress`.")
    layers = (nn.Linear, nn.modules.conv._ConvNd)
    for layer_name, bn_name in record["pairs"]:
        add_bias(_get(model, layer_name, layers, "Conv/Linear layer"))
        bn = _get(model, bn_name, (nn.modules.batchnorm._BatchNorm, nn.Identity, FoldedBatchNormAct), "BatchNorm")
        if isinstance(bn, nn.modules.batchnorm._BatchNorm):
            set_module(model, bn_name, remainder(bn))
    for name in record.get("inplace_relu", []):
        _get(model, name, (nn.ReLU,), "ReLU").inplace = True
    return model
