"""slimcart: make the AI models of an e-commerce platform small and fast, and measure it.

The public API is imported lazily, so that ``import slimcart.artifact`` (a serving process, the
memory probe) does not load the training and data libraries."""
__version__ = "0.1.0"

from .errors import DataError, ModelError, RecipeError, SlimcartError, UsageError  # noqa: E402,F401

_LAZY = {
    "MeasureConfig": ("recipe", "MeasureConfig"),
    "Recipe": ("recipe", "Recipe"),
    "load_task": ("tasks", "load_task"),
    "compress": ("pipeline", "compress"),
    "load_bundle": ("serving", "load_bundle"),
    "resolve_source": ("sources", "resolve_source"),
    "register_model": ("models", "register_model"),
}
__all__ = ["DataError", "ModelError", "RecipeError", "SlimcartError", "UsageError", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(f".{module}", __name__), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'slimcart' has no attribute {name!r}")
