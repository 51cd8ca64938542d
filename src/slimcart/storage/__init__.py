"""How tensors are laid out on disk. ``encode`` turns a state dict into the tensors written to
safetensors plus a JSON manifest; ``decode`` restores the exact state dict from them.

Manifests: ``{"scheme": "dense"}`` (tensors as they are), ``{"scheme": "sparse", ...}`` (pruned
tensors in bitmask / relative form, see sparse.py) and ``{"scheme": "codebook", "version": 1,
"tensors": {...}, "rest": <sparse manifest>}`` (weight-shared tensors as a codebook plus packed
indices, see codebook.py; every other tensor as in the sparse manifest ``rest``). ``encode``
writes a codebook manifest only when some tensor is smaller that way.
"""
from __future__ import annotations

from typing import Any

import torch


def encode(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Each tensor in the smallest exact encoding (dense, sparse or codebook)."""
    from .codebook import encode_state as codebook_encode
    from .sparse import encode_state

    shared, entries, rest = codebook_encode(tensors)
    stored, manifest = encode_state(rest)
    if not entries:
        return stored, manifest
    return {**stored, **shared}, {"scheme": "codebook", "version": 1, "tensors": entries, "rest": manifest}


def decode(tensors: dict[str, torch.Tensor], manifest: dict[str, Any] | None) -> dict[str, torch.Tensor]:
    if not manifest or manifest.get("scheme") == "dense":
        return tensors
    from .sparse import decode_state

    if manifest.get("scheme") == "codebook":
        if manifest.get("version") != 1 or not isinstance(manifest.get("tensors"), dict):
            raise ValueError(f"unsupported storage manifest 'codebook' version {manifest.get('version')!r}")
        from .codebook import decode_state as codebook_decode

        shared, rest = codebook_decode(tensors, manifest["tensors"])
        return {**decode(rest, manifest.get("rest")), **shared}
    return decode_state(tensors, manifest)
