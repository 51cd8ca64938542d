"""Architecture registry: ``{"arch": name, "config": {...}}`` <-> nn.Module (timm style)."""
from __future__ import annotations

from typing import Any, Callable

import torch
from pydantic import BaseModel, ValidationError

from ..errors import ModelError, closest

_ARCHS: dict[str, tuple[type[BaseModel], Callable[[Any], torch.nn.Module]]] = {}


def register_model(name: str, config_cls: type[BaseModel]):
    def deco(fn: Callable[[Any], torch.nn.Module]):
        _ARCHS[name] = (config_cls, fn)
        return fn

    return deco


def spec(arch: str, config: BaseModel) -> dict[str, Any]:
    return {"arch": arch, "config": config.model_dump(mode="json")}


def build(model_spec: dict[str, Any]) -> torch.nn.Module:
    """Rebuild an architecture from its saved spec (weights are loaded separately)."""
    arch = model_spec.get("arch")
    if arch not in _ARCHS:
        raise ModelError(f"Unknown model architecture {arch!r}.{closest(str(arch), list(_ARCHS))}",
                         f"Known architectures: {', '.join(_ARCHS)}.")
    cfg_cls, fn = _ARCHS[arch]
    try:
        cfg = cfg_cls.model_validate(model_spec.get("config", {}))
    except ValidationError as exc:
        raise ModelError(f"Model spec for {arch!r} is invalid: {exc}") from None
    model = fn(cfg)
    if model_spec.get("reshape"):
        # a structurally pruned model: the base architecture with some layers narrowed
        from .reshape import apply_reshape

        apply_reshape(model, model_spec["reshape"])
    if model_spec.get("row_pruning"):
        # embedding tables with rare-id rows dropped and an id map to the compact rows
        from .compact_embedding import apply_row_pruning

        apply_row_pruning(model, model_spec["row_pruning"])
    return model
