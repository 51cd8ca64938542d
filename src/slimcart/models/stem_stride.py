"""A pretrained image network whose first convolution (the stem) moves over the photo in longer
steps: every feature map after it is smaller, as at a lower resolution, without resizing the input.
A resize is an operator of its own at batch 1 (about 9% of a 160 px EfficientNet-Lite0 student's
time in ONNX Runtime's profiler); a longer stem stride costs nothing. The weights keep their shapes
and names; timm's ``Conv2dSame`` computes its "same" padding from the stride, a plain ``Conv2d``
keeps its padding."""
from __future__ import annotations

from torch import nn

from ..errors import ModelError


def stem(model: nn.Module) -> tuple[str, nn.Conv2d]:
    """The first ``Conv2d`` of ``model`` (its stem in timm and torchvision image networks)."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            return name, module
    raise ModelError(f"{type(model).__name__} has no Conv2d layer whose stride a student could lengthen.",
                     "stem_stride is for convolutional image networks; use student.resolution instead.")


def apply_stem_stride(model: nn.Module, stride: int) -> nn.Module:
    _, conv = stem(model)
    conv.stride = (int(stride), int(stride))
    return model
