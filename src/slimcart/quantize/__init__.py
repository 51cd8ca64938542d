"""Quantization techniques."""
from . import dynamic, ort  # noqa: F401
