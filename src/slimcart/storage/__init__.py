"""How tensors are laid out on disk. ``encode`` turns a state dict into the tensors written to
safetensors plus a JSON manifest; ``decode`` restores the exact state dict from them."""
from __future__ import annotations

from typing import Any

import torch


def encode(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Each tensor in the smallest exact encoding (dense, or sparse when that is smaller)."""
    try:
        from .sparse import encode_state
    except ImportError:
        return tensors, {"scheme": "dense"}
    return encode_state(tensors)


def decode(tensors: dict[str, torch.Tensor], manifest: dict[str, Any] | None) -> dict[str, torch.Tensor]:
    if not manifest or manifest.get("scheme") == "dense":
        return tensors
    from .sparse import decode_state

    return decode_state(tensors, manifest)
