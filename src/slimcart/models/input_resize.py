"""A model that resizes its image input before its first layer: a lower-resolution student that
keeps the teacher's interface (the same preprocessing and input size), so the bundle, the ONNX
graph and every runtime serve it unchanged. The resize is a forward pre-hook, so the weights keep
their names; it is bilinear without antialiasing (ONNX ``Resize``), which at an integer factor of 2
is the mean of each 2x2 block of pixels."""
from __future__ import annotations

import functools

import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ModelError


def _resize(size: tuple[int, int], _module: nn.Module, args: tuple) -> tuple:
    x = args[0]
    if not isinstance(x, Tensor) or x.dim() != 4:
        raise ModelError(f"input_resize expects images of shape (batch, channels, height, width); got "
                         f"{getattr(x, 'shape', type(x).__name__)}.")
    return (F.interpolate(x, size=size, mode="bilinear", align_corners=False),) + tuple(args[1:])


def apply_input_resize(model: nn.Module, size: list[int]) -> nn.Module:
    h, w = (int(s) for s in size)
    model.register_forward_pre_hook(functools.partial(_resize, (h, w)))
    return model
