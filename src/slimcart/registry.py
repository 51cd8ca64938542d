"""Technique registry: a short name -> (config class, apply function, formats).

A technique is a frozen pydantic config plus one function
``apply(state: ModelState, config, ctx: StageContext) -> StageReport``.
``accepts`` names the model formats it can work on and ``produces`` the format it leaves,
so that a recipe's order is checked before anything runs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from pydantic import BaseModel, ConfigDict

from .errors import UsageError, closest

# Model formats flowing through a pipeline.
TORCH = "torch"            # float eager PyTorch module
TORCH_INT8 = "torch_int8"  # eager module with quantized layers (not exportable to ONNX)
ONNX = "onnx"              # an ONNX graph served by ONNX Runtime
FORMATS = (TORCH, TORCH_INT8, ONNX)


class TechniqueConfig(BaseModel):
    """Base of every technique config: frozen, strict about unknown keys."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass(frozen=True)
class Technique:
    name: str
    config_cls: type[TechniqueConfig]
    apply: Callable
    accepts: tuple[str, ...]
    produces: str | None  # None: leaves the format as it found it
    summary: str


_REGISTRY: dict[str, Technique] = {}


def register(name: str, config_cls: type[TechniqueConfig], *, accepts: tuple[str, ...],
             produces: str | None = None, summary: str = ""):
    """Decorator registering ``apply`` under ``name``."""

    def deco(fn: Callable) -> Callable:
        if name in _REGISTRY and _REGISTRY[name].apply.__module__ != fn.__module__:
            raise RuntimeError(f"technique {name!r} registered twice")
        _REGISTRY[name] = Technique(name, config_cls, fn, tuple(accepts), produces,
                                    summary or (fn.__doc__ or "").strip().split("\n")[0])
        return fn

    return deco


def _load_builtins() -> None:
    """Import every module of the technique families; importing registers the techniques."""
    import importlib
    import pkgutil

    for family in ("prune", "quantize", "accelerate", "distill", "parallel"):
        try:
            pkg = importlib.import_module(f"{__package__}.{family}")
        except ModuleNotFoundError:
            continue
        for info in pkgutil.iter_modules(pkg.__path__):
            importlib.import_module(f"{pkg.__name__}.{info.name}")


def techniques() -> dict[str, Technique]:
    _load_builtins()
    return dict(sorted(_REGISTRY.items()))


def get(name: str) -> Technique:
    table = techniques()
    if name not in table:
        raise UsageError(f"Unknown technique {name!r}.{closest(name, list(table))}",
                         f"Known techniques: {', '.join(table)}.")
    return table[name]
