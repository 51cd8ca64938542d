"""Acceleration: export and graph-level techniques."""
from . import onnx_export  # noqa: F401
