"""TensorFlow "same" padding made static for export.

timm's ``Conv2dSame`` (the stride-2 convolutions of the TF EfficientNets) works its padding out from
the input's height and width at every call; traced into ONNX that is a chain of Shape / Gather /
Cast / Sub / Div / Concat nodes and a Pad whose amounts ONNX Runtime cannot fold, and which its NCHWc
layout then has to reorder around. The exported graph has a fixed height and width (only the batch
is dynamic), so the amounts are known: ``static_same_padding`` returns a copy of the model in which
each such convolution pads by constants, and ``fuse_zero_pads`` then folds those Pads into the Convs'
own (asymmetric) ``pads``. The outputs are the same to the last bit."""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn


class StaticSameConv(nn.Module):
    """A Conv2dSame's weights with the padding it computed for one input size."""

    def __init__(self, conv: nn.Conv2d, pads: tuple[int, int, int, int]):
        super().__init__()
        self.conv, self.pads = conv, pads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.conv
        return F.conv2d(F.pad(x, self.pads), c.weight, c.bias, c.stride, 0, c.dilation, c.groups)


def _same(size: int, k: int, s: int, d: int) -> tuple[int, int]:
    total = max((-(-size // s) - 1) * s + (k - 1) * d + 1 - size, 0)
    return total // 2, total - total // 2


def static_same_padding(model: nn.Module, example: tuple[torch.Tensor, ...]) -> nn.Module:
    """``model`` itself when it has no Conv2dSame, else a copy with static pads for ``example``'s size."""
    same = [n for n, m in model.named_modules() if type(m).__name__ == "Conv2dSame"]
    if not same:
        return model
    sizes: dict[str, tuple[int, int]] = {}
    mods = dict(model.named_modules())
    hooks = [mods[n].register_forward_pre_hook(lambda _m, a, n=n: sizes.__setitem__(n, tuple(a[0].shape[-2:])))
             for n in same]
    try:
        with torch.no_grad():
            model(*example)
    finally:
        for h in hooks:
            h.remove()
    out = copy.deepcopy(model)
    for n in same:
        if n not in sizes:
            continue
        conv = out.get_submodule(n)
        (h, w), (kh, kw) = sizes[n], conv.weight.shape[-2:]
        top, bottom = _same(h, kh, conv.stride[0], conv.dilation[0])
        left, right = _same(w, kw, conv.stride[1], conv.dilation[1])
        parent, _, attr = n.rpartition(".")
        setattr(out.get_submodule(parent) if parent else out, attr, StaticSameConv(conv, (left, right, top, bottom)))
    return out


# the exporter's arithmetic on constant pads (evaluated here with ONNX's reference implementation)
_FOLDABLE = {"Cast", "ConstantOfShape", "Concat", "Reshape", "Slice", "Transpose", "Unsqueeze", "Squeeze", "Identity"}


def fuse_zero_pads(model_proto) -> int:
    """Fold each zero-valued constant Pad whose only reader is a Conv into that Conv's ``pads``
    (ONNX Runtime's own PadFusion refuses the exporter's Pad: its pads come out of a chain of shape
    operators, and it has an empty value input). Returns the number of Pads removed; ``model_proto`` is changed in place."""
    import numpy as np
    from onnx import helper, numpy_helper
    from onnx.reference import ReferenceEvaluator

    g = model_proto.graph
    known = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    for n in g.node:  # constants in topological order: Constant, then the shape arithmetic over them
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            known[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
        elif n.op_type in _FOLDABLE and all(i in known for i in n.input if i):
            out = ReferenceEvaluator(n).run(None, {i: known[i] for i in n.input if i})
            known.update(zip(n.output, out))
    readers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    outputs = {o.name for o in g.output}
    removed = []
    for pad in [n for n in g.node if n.op_type == "Pad"]:
        mode = next((a.s for a in pad.attribute if a.name == "mode"), b"constant")
        pads = known.get(pad.input[1]) if len(pad.input) > 1 else None
        value = pad.input[2] if len(pad.input) > 2 else ""
        users = readers.get(pad.output[0], [])
        if (mode != b"constant" or pads is None or pad.output[0] in outputs or len(users) != 1
                or users[0].op_type != "Conv" or (len(pad.input) > 3 and pad.input[3])
                or (value and (value not in known or np.any(known[value] != 0)))):
            continue
        conv, pads = users[0], [int(p) for p in pads.reshape(-1)]
        half = len(pads) // 2
        if pads[0] or pads[1] or pads[half] or pads[half + 1] or min(pads) < 0:
            continue
        attrs = {a.name: a for a in conv.attribute}
        if "auto_pad" in attrs and attrs["auto_pad"].s not in (b"", b"NOTSET"):
            continue
        spatial = half - 2
        old = list(attrs["pads"].ints) if "pads" in attrs else [0] * (2 * spatial)
        new = [old[i] + pads[2 + i] for i in range(spatial)] + [old[spatial + i] + pads[half + 2 + i] for i in range(spatial)]
        if "pads" in attrs:
            conv.attribute.remove(attrs["pads"])
        conv.attribute.append(helper.make_attribute("pads", new))
        conv.input[0] = pad.input[0]
        removed.append(pad)
    for pad in removed:
        g.node.remove(pad)
    # drop what fed only the removed Pads (their Constant / Cast chains)
    while True:
        used = {i for n in g.node for i in n.input} | outputs
        dead = [n for n in g.node if n.op_type in _FOLDABLE | {"Constant"} and not any(o in used for o in n.output)]
        if not dead:
            break
        for n in dead:
            g.node.remove(n)
    return len(removed)
