"""Pruning techniques."""
from . import magnitude  # noqa: F401
