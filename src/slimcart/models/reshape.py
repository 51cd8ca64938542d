"""Narrowed layers of a structurally pruned model, as JSON, so a saved model rebuilds.

``record_reshape(model, base)`` describes every resizable layer (Conv, Linear, BatchNorm,
LayerNorm, Embedding) whose shape differs from ``base`` (the freshly built architecture; with no
``base`` every such layer is listed), plus the size attributes that attention modules read in
``forward``::

    {"version": 1,
     "modules": {"layers.0.conv1": {"type": "Conv2d", "in": 4, "out": 2, "groups": 1},
                 "layers.0.bn1": {"type": "BatchNorm2d", "features": 2},
                 "encoder.encoder.layer.0.attention.self.query": {"type": "Linear", "in": 32, "out": 16}},
     "params": {},   # bare nn.Parameters (not inside such a layer) whose shape changed
     "attrs": {"encoder.encoder.layer.0.attention.self":
               {"num_attention_heads": 2, "attention_head_size": 8, "all_head_size": 16}}}

``apply_reshape(model, record)`` replaces those layers of a freshly built model with new ones of
the recorded sizes (same kernel, stride, bias, eps... as the layer they replace) and sets the
attributes; the weights are then loaded from the saved state dict.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import ModelError

VERSION = 1
# attributes that multi-head attention modules (transformers' BERT family) use in forward
ATTENTION_ATTRS = ("num_attention_heads", "attention_head_size", "all_head_size")


def _shape(mod: nn.Module) -> dict[str, Any] | None:
    kind = type(mod).__name__
    if isinstance(mod, nn.modules.conv._ConvNd):
        return {"type": kind, "in": mod.in_channels, "out": mod.out_channels, "groups": mod.groups}
    if isinstance(mod, nn.Linear):
        return {"type": kind, "in": mod.in_features, "out": mod.out_features}
    if isinstance(mod, nn.modules.batchnorm._BatchNorm):
        return {"type": kind, "features": mod.num_features}
    if isinstance(mod, nn.LayerNorm):
        return {"type": kind, "shape": list(mod.normalized_shape)}
    if isinstance(mod, nn.Embedding):
        return {"type": kind, "num": mod.num_embeddings, "dim": mod.embedding_dim}
    return None


def _attrs(mod: nn.Module) -> dict[str, int] | None:
    if all(isinstance(getattr(mod, a, None), int) for a in ATTENTION_ATTRS):
        return {a: getattr(mod, a) for a in ATTENTION_ATTRS}
    return None


def layer_shapes(model: nn.Module) -> dict[str, dict[str, Any]]:
    """The shape record of every resizable layer, by module name."""
    return {n: s for n, m in model.named_modules() if n and (s := _shape(m)) is not None}


def free_params(model: nn.Module) -> dict[str, list[int]]:
    """Shapes of the parameters held directly by modules other than the resizable layers."""
    return {f"{n}.{p}" if n else p: list(t.shape) for n, m in model.named_modules() if _shape(m) is None
            for p, t in m.named_parameters(recurse=False)}


def record_reshape(model: nn.Module, base: nn.Module | None = None) -> dict[str, Any]:
    """JSON description of the layers (and attention sizes) of ``model`` that differ from ``base``."""
    b_shapes, b_params, b_attrs = ({}, {}, {}) if base is None else (
        layer_shapes(base), free_params(base), {n: a for n, m in base.named_modules() if (a := _attrs(m))})
    return {"version": VERSION,
            "modules": {n: s for n, s in layer_shapes(model).items() if b_shapes.get(n) != s},
            "params": {n: s for n, s in free_params(model).items() if b_params.get(n) != s},
            "attrs": {n: a for n, m in model.named_modules() if (a := _attrs(m)) and b_attrs.get(n) != a}}


_PLAIN_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def _resized_conv_subclass(old: nn.Module, rec: dict[str, Any], kw: dict[str, Any]) -> nn.Module:
    """A copy of a Conv subclass with the new channel counts (its weights are loaded afterwards)."""
    import copy

    new = copy.deepcopy(old)
    new.in_channels, new.out_channels = rec["in"], rec["out"]
    new.groups = rec.get("groups", old.groups)
    new.weight = nn.Parameter(torch.empty(new.out_channels, new.in_channels // new.groups, *old.kernel_size, **kw))
    if old.bias is not None:
        new.bias = nn.Parameter(torch.empty(new.out_channels, **kw))
    return new


_PLAIN_BNS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _resized_bn_subclass(old: nn.Module, rec: dict[str, Any], kw: dict[str, Any]) -> nn.Module:
    """A copy of a BatchNorm subclass with ``rec["features"]`` channels (statistics loaded afterwards)."""
    import copy

    new, n = copy.deepcopy(old), rec["features"]
    new.num_features = n
    if old.affine:
        new.weight, new.bias = nn.Parameter(torch.ones(n, **kw)), nn.Parameter(torch.zeros(n, **kw))
    if old.track_running_stats:
        new.running_mean, new.running_var = torch.zeros(n, **kw), torch.ones(n, **kw)
    return new


def _resized(old: nn.Module, rec: dict[str, Any], name: str) -> nn.Module:
    ref = next(iter(old.parameters(recurse=False)), None)
    kw = {"device": ref.device, "dtype": ref.dtype} if ref is not None else {}
    if isinstance(old, nn.modules.conv._ConvNd) and type(old) not in _PLAIN_CONVS and not old.transposed:
        return _resized_conv_subclass(old, rec, kw)  # e.g. timm's Conv2dSame: another signature
    if isinstance(old, nn.modules.conv._ConvNd):
        return type(old)(rec["in"], rec["out"], old.kernel_size, old.stride, old.padding, old.dilation,
                         rec.get("groups", old.groups), old.bias is not None, old.padding_mode, **kw)
    if isinstance(old, nn.Linear):
        return nn.Linear(rec["in"], rec["out"], bias=old.bias is not None, **kw)
    if isinstance(old, nn.modules.batchnorm._BatchNorm) and type(old) not in _PLAIN_BNS:
        return _resized_bn_subclass(old, rec, kw)  # e.g. timm's BatchNormAct2d: keeps its activation
    if isinstance(old, nn.modules.batchnorm._BatchNorm):
        return type(old)(rec["features"], old.eps, old.momentum, old.affine, old.track_running_stats, **kw)
    if isinstance(old, nn.LayerNorm):
        return nn.LayerNorm(rec["shape"], old.eps, old.elementwise_affine, bias=old.bias is not None, **kw)
    if isinstance(old, nn.Embedding):
        return nn.Embedding(rec["num"], rec["dim"], old.padding_idx, old.max_norm, old.norm_type,
                            old.scale_grad_by_freq, old.sparse, **kw)
    raise ModelError(f"reshape: layer {name} is a {type(old).__name__}, which cannot be resized.")


def _size_keys(cls: type) -> tuple[str, ...] | None:
    """The record keys that size a layer of class ``cls``; None: not a resizable layer."""
    if issubclass(cls, (nn.modules.conv._ConvNd, nn.Linear)):
        return ("in", "out")
    if issubclass(cls, nn.modules.batchnorm._BatchNorm):
        return ("features",)
    if issubclass(cls, nn.LayerNorm):
        return ("shape",)
    if issubclass(cls, nn.Embedding):
        return ("num", "dim")
    return None


def _positive(value: Any) -> bool:
    return type(value) is int and value > 0


def _layer_problem(rec: dict[str, Any], cls: type) -> str | None:
    for key in _size_keys(cls) or ():
        value = rec.get(key)
        if key == "shape" and not (isinstance(value, list) and value and all(map(_positive, value))):
            return f"'shape' must be a list of positive whole numbers, got {value!r}"
        if key != "shape" and not _positive(value):
            return f"{key!r} must be a positive whole number, got {value!r}"
    if "groups" in rec and not _positive(rec["groups"]):
        return f"'groups' must be a positive whole number, got {rec['groups']!r}"
    return None


def record_problem(record: Any) -> str | None:
    """What is wrong with a reshape record (naming the layer and key), or None if it is well formed."""
    if not isinstance(record, dict) or record.get("version") != VERSION:
        return f"expected a mapping with version {VERSION}"
    if not isinstance(record.get("modules"), dict):
        return "'modules' must map layer names to their sizes"
    for key in ("params", "attrs"):
        if not isinstance(record.get(key, {}), dict):
            return f"{key!r} must map names to values"
    for name, rec in record["modules"].items():
        if not isinstance(rec, dict) or not isinstance(rec.get("type"), str):
            return f"layer {name!r}: the record needs a 'type' naming the layer class"
        cls = getattr(nn, rec["type"], None)
        if isinstance(cls, type) and (problem := _layer_problem(rec, cls)):
            return f"layer {name!r}: {problem}"
    for name, shape in record.get("params", {}).items():
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            return f"parameter {name!r}: the shape must be a list of whole numbers, got {shape!r}"
    for name, attrs in record.get("attrs", {}).items():
        if not isinstance(attrs, dict):
            return f"layer {name!r}: 'attrs' must map attribute names to sizes"
        for key, value in attrs.items():
            if key not in ATTENTION_ATTRS:
                return (f"layer {name!r}: attribute {key!r} may not be set; only "
                        f"{', '.join(ATTENTION_ATTRS)} are")
            if not _positive(value):
                return f"layer {name!r}: attribute {key!r} must be a positive whole number, got {value!r}"
    return None


def _module(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise ModelError(f"reshape: the model has no layer {name!r}; the saved reshape record does "
                         f"not fit this architecture.") from None


def apply_reshape(model: nn.Module, reshape: dict[str, Any]) -> nn.Module:
    """Resize the recorded layers of ``model`` in place (fresh weights of the recorded shapes)."""
    if problem := record_problem(reshape):
        raise ModelError(f"reshape: the saved record is damaged: {problem}.",
                         "Save the model again with `slimcart compress`.")
    for name, rec in reshape["modules"].items():
        old = _module(model, name)
        if type(old).__name__ != rec["type"]:
            raise ModelError(f"reshape: layer {name} is a {type(old).__name__}, the record says "
                             f"{rec['type']}.")
        if problem := _layer_problem(rec, type(old)):
            raise ModelError(f"reshape: layer {name!r}: {problem}.")
        parent_name, _, child = name.rpartition(".")
        setattr(_module(model, parent_name) if parent_name else model, child, _resized(old, rec, name))
    for name, shape in reshape.get("params", {}).items():
        owner, _, pname = name.rpartition(".")
        mod = _module(model, owner) if owner else model
        old = mod._parameters.get(pname)
        if old is None:
            raise ModelError(f"reshape: the model has no parameter {name!r}.")
        setattr(mod, pname, nn.Parameter(old.new_empty(shape), requires_grad=old.requires_grad))
    for name, attrs in reshape.get("attrs", {}).items():
        mod = _module(model, name)
        for key, value in attrs.items():
            if not hasattr(mod, key):
                raise ModelError(f"reshape: layer {name} has no attribute {key!r}.")
            setattr(mod, key, value)
    return model

