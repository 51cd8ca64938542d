"""torchvision and timm classifiers: an architecture name plus a safetensors state dict.

A reference is ``LIBRARY:NAME``: ``torchvision:resnet18``, ``timm:efficientnet_lite0``
(torchvision classification models; any timm model name, with or without a ``.tag``). Specs::

    {"arch": "torchvision", "config": {"name": "resnet18", "num_classes": 3, "kwargs": {}}}
    {"arch": "timm", "config": {"name": "efficientnet_lite0", "num_classes": 3, "in_chans": 3,
                                "kwargs": {}}}

The number of classes (and timm's input channels) comes from the state dict; weights are never
downloaded (``weights=None`` / ``pretrained=False``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from ..errors import ModelError, closest
from .registry import load_strict, register_model, spec

LIBRARIES = ("torchvision", "timm")


class TorchvisionConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    num_classes: int = Field(ge=1)
    kwargs: dict[str, Any] = {}


class TimmConfig(TorchvisionConfig):
    in_chans: int = Field(default=3, ge=1)


def _library(lib: str):
    try:
        return __import__(lib)
    except ImportError as exc:
        raise ModelError(f"{lib} models need the {lib} package, which cannot be imported ({exc}).",
                         f"Install it: pip install {lib}") from None


def _create(lib: str, name: str, kwargs: dict[str, Any], **sizes: int) -> nn.Module:
    mod = _library(lib)
    if lib == "timm":
        if not mod.is_model(name):
            raise ModelError(f"Unknown timm model {name!r}.{closest(name, mod.list_models())}")
        return mod.create_model(name, pretrained=False, **sizes, **kwargs)
    import torchvision.models as tvm

    known = tvm.list_models(module=tvm)
    if name not in known:
        raise ModelError(f"Unknown torchvision classification model {name!r}.{closest(name, known)}")
    return tvm.get_model(name, weights=None, **sizes, **kwargs)


@register_model("torchvision", TorchvisionConfig)
def build_torchvision(cfg: TorchvisionConfig) -> nn.Module:
    return _create("torchvision", cfg.name, cfg.kwargs, num_classes=cfg.num_classes)


@register_model("timm", TimmConfig)
def build_timm(cfg: TimmConfig) -> nn.Module:
    return _create("timm", cfg.name, cfg.kwargs, num_classes=cfg.num_classes, in_chans=cfg.in_chans)


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if not Path(path).is_file():
        raise ModelError(f"Weights file {path} does not exist.")
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types for damaged files
        raise ModelError(f"{path} is not a readable safetensors file: {exc}") from None


def parse_ref(ref: str) -> tuple[str, str]:
    lib, sep, name = ref.partition(":")
    if not sep or lib not in LIBRARIES or not name:
        raise ModelError(f"Model reference {ref!r} is not LIBRARY:NAME.",
                         "Use torchvision:NAME or timm:NAME, e.g. torchvision:resnet18.")
    return lib, name


def _probe(lib: str, name: str, kwargs: dict[str, Any]) -> nn.Module:
    """The architecture with its default head, on the meta device when possible (no memory, fast)."""
    try:
        with torch.device("meta"):
            return _create(lib, name, kwargs)
    except ModelError:
        raise
    except Exception:
        return _create(lib, name, kwargs)


def _classifier(model: nn.Module, lib: str) -> str:
    names = getattr(model, "pretrained_cfg", {}).get("classifier") if lib == "timm" else None
    if isinstance(names, (list, tuple)):
        names = names[0]
    if names:
        return names
    width = getattr(model, "num_classes", 1000)
    heads = [n for n, m in model.named_modules() if (isinstance(m, nn.Linear) and m.out_features == width)
             or (isinstance(m, nn.modules.conv._ConvNd) and m.out_channels == width)]
    if not heads:
        raise ModelError("Cannot find the classifier layer of this architecture to read the number of classes.")
    return heads[-1]


def load_zoo(ref: str, weights: str | Path, *, kwargs: dict[str, Any] | None = None
             ) -> tuple[nn.Module, dict[str, Any]]:
    """(module with the weights, spec) for ``ref`` = torchvision:NAME or timm:NAME."""
    lib, name = parse_ref(ref)
    kwargs = dict(kwargs or {})
    state = read_safetensors(weights)
    probe = _probe(lib, name, kwargs)
    key = _classifier(probe, lib) + ".weight"
    if key not in state:
        raise ModelError(f"{weights} has no {key}, the classifier of {ref}; cannot tell the number of classes.",
                         "Save the full state_dict() of the classification model.")
    num_classes = int(state[key].shape[0])
    if lib == "timm":
        first = next((n for n, m in probe.named_modules() if isinstance(m, nn.Conv2d)), None)
        in_chans = int(state[f"{first}.weight"].shape[1]) if first and f"{first}.weight" in state else 3
        cfg: TorchvisionConfig = TimmConfig(name=name, num_classes=num_classes, in_chans=in_chans, kwargs=kwargs)
        model = build_timm(cfg)
    else:
        cfg = TorchvisionConfig(name=name, num_classes=num_classes, kwargs=kwargs)
        model = build_torchvision(cfg)
    load_strict(model, state, str(weights))
    return model.eval(), spec(lib, cfg)
