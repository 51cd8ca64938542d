"""Checks on a model folder's ``slimcart.json``, so a damaged file is reported by key, not as a
crash while the model is rebuilt."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import ModelError
from .models.reshape import record_problem
from .registry import TORCH_INT8


def _problem(meta: dict[str, Any]) -> tuple[str, str] | None:
    """The first damaged key of ``meta`` and what is wrong with it, or None."""
    from .formats import formats

    known = list(formats())
    if meta["format"] not in known:
        return "format", f"unknown model format {meta['format']!r}; known: {', '.join(known)}"
    weights = meta["weights"]
    if not isinstance(weights, str) or not weights or Path(weights).name != weights:
        return "weights", f"must be the name of a file in the folder, got {weights!r}"
    model = meta["model"]
    if not isinstance(model, dict):
        return "model", f"must be a mapping with 'arch' and 'config', got {type(model).__name__}"
    if not isinstance(model.get("arch"), str):
        return "model.arch", "must name the architecture (a string)"
    if not isinstance(model.get("config", {}), dict):
        return "model.config", "must be a mapping"
    if model.get("reshape") and (why := record_problem(model["reshape"])):
        return "model.reshape", why
    inputs = meta.get("inputs")
    if not isinstance(inputs, list) or not inputs or not all(isinstance(n, str) and n for n in inputs):
        return "inputs", f"must be a list of input names (strings), got {inputs!r}"
    if not isinstance(meta.get("encoding") or {}, dict):
        return "encoding", "must be a mapping"
    if meta["format"] == TORCH_INT8:
        quant = meta.get("quant")
        if not isinstance(quant, dict) or not isinstance(quant.get("layers"), list) \
                or not all(isinstance(n, str) for n in quant["layers"]):
            return "quant.layers", "a torch_int8 model needs the list of its quantized layer names"
        if not isinstance(quant.get("per_channel"), bool):
            return "quant.per_channel", "must be true or false"
    return None


def validate_meta(meta: dict, path: Path) -> None:
    """Raise ModelError naming ``path`` and the key if ``meta`` cannot describe a saved model."""
    if problem := _problem(meta):
        key, why = problem
        raise ModelError(f"{path}: key {key!r} is damaged: {why}.",
                         "The model folder is damaged or was edited by hand; save the model again "
                         "with `slimcart train` or `slimcart compress`.")
