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


# Plain nn.Modules given in Python (no registered architecture): an untouched copy of each, for
# this process only, so that their saved variants can be rebuilt and reloaded while it runs.
_INSTANCES: dict[str, torch.nn.Module] = {}


def instance_spec(model: torch.nn.Module) -> dict[str, Any]:
    """Spec of a plain module: its class name and a token valid in this process only."""
    import copy

    cls = type(model)
    token = f"{cls.__module__}.{cls.__qualname__}#{len(_INSTANCES)}"
    _INSTANCES[token] = copy.deepcopy(model).cpu().eval()
    return {"arch": "module", "config": {"class": f"{cls.__module__}.{cls.__qualname__}", "token": token}}


def _build_instance(model_spec: dict[str, Any]) -> torch.nn.Module:
    import copy

    cfg = model_spec.get("config") or {}
    base = _INSTANCES.get(cfg.get("token", ""))
    if base is None:
        raise ModelError(f"This model was made from the Python class {cfg.get('class')!r}, which slimcart "
                         "cannot rebuild without running your code.",
                         "Serve its ONNX artifact (the variant's served/onnxruntime folder, or an "
                         "onnx_export stage), or register the class with slimcart.models.register_model "
                         "and a config so that its folder rebuilds it.")
    return copy.deepcopy(base)


def build(model_spec: dict[str, Any]) -> torch.nn.Module:
    """Rebuild an architecture from its saved spec (weights are loaded separately)."""
    arch = model_spec.get("arch")
    if arch == "module":
        model = _build_instance(model_spec)
        return _transforms(model, model_spec)
    if arch not in _ARCHS:
        raise ModelError(f"Unknown model architecture {arch!r}.{closest(str(arch), list(_ARCHS))}",
                         f"Known architectures: {', '.join(_ARCHS)}.")
    cfg_cls, fn = _ARCHS[arch]
    try:
        cfg = cfg_cls.model_validate(model_spec.get("config", {}))
    except ValidationError as exc:
        raise ModelError(f"Model spec for {arch!r} is invalid: {exc}") from None
    return _transforms(fn(cfg), model_spec)


def _transforms(model: torch.nn.Module, model_spec: dict[str, Any]) -> torch.nn.Module:
    if model_spec.get("kept_blocks"):
        # a shallower image network: residual blocks removed from its stages (before any narrowing)
        from .drop_blocks import apply_kept_blocks

        apply_kept_blocks(model, model_spec["kept_blocks"])
    if model_spec.get("stem_stride"):
        # an image network whose first convolution takes longer steps (a lower-resolution student)
        from .stem_stride import apply_stem_stride

        apply_stem_stride(model, model_spec["stem_stride"])
    if model_spec.get("reshape"):
        # a structurally pruned model: the base architecture with some layers narrowed
        from .reshape import apply_reshape

        apply_reshape(model, model_spec["reshape"])
    if model_spec.get("row_pruning"):
        # embedding tables with rare-id rows dropped and an id map to the compact rows
        from .compact_embedding import apply_row_pruning

        apply_row_pruning(model, model_spec["row_pruning"])
    if model_spec.get("vocab_pruning"):
        # a text model's word-embedding table cut to the task's tokens (before embedding_quant)
        from .compact_embedding import apply_vocab_pruning

        apply_vocab_pruning(model, model_spec["vocab_pruning"])
    if model_spec.get("input_resize"):
        # an image model that sees its input resized (a lower-resolution student)
        from .input_resize import apply_input_resize

        apply_input_resize(model, model_spec["input_resize"])
    if model_spec.get("bn_folded"):
        # BatchNorm folded into the Conv/Linear before it: the layer gets a bias, the BN goes
        from .fold import apply_folding

        apply_folding(model, model_spec["bn_folded"])
    if model_spec.get("embedding_quant"):
        # embedding tables stored as packed low-bit rows with per-row scales (after row pruning)
        from .quant_embedding import apply_embedding_quant

        apply_embedding_quant(model, model_spec["embedding_quant"])
    if model_spec.get("weight_only"):
        # Linear layers holding packed int8/int4 weight codes and group scales
        from .weight_only_linear import apply_weight_only

        apply_weight_only(model, model_spec["weight_only"])
    if model_spec.get("half"):
        # weights cast to float16/bfloat16 (norm layers kept float32) so the saved dtypes load as they are
        from ..quantize.half import apply_half

        apply_half(model, model_spec["half"])
    return model


def load_strict(model: torch.nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """Load ``state`` into ``model``: every key present, none extra, same shapes; else a ModelError."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} (model: {tuple(own[k].shape)})" for k in own
              if k in state and state[k].shape != own[k].shape]
    problems = [f"{label} {len(keys)}: {', '.join(keys[:5])}{', ...' if len(keys) > 5 else ''}"
                for label, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                                    ("shape mismatches", shapes)) if keys]
    if problems:
        raise ModelError(f"The weights in {where} do not match the architecture; " + "; ".join(problems),
                         "Save the state_dict() of exactly this architecture (same names and sizes).")
    model.load_state_dict(state, strict=True)
