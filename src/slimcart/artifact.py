"""Saved models: a folder with the weights, ``slimcart.json`` (what rebuilds the model, how it
was made) and ``examples.safetensors`` (a real input batch, so the model can be benchmarked
alone). Nothing is unpickled on load: safetensors and JSON only."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from . import __version__, formats
from .errors import ModelError
from .meta import validate_meta
from .stage import ModelState

META = "slimcart.json"
EXAMPLES = "examples.safetensors"


def save(state: ModelState, folder: Path, *, task: dict[str, Any], examples: tuple[torch.Tensor, ...],
         input_names: tuple[str, ...], stages: list[dict[str, Any]] | None = None,
         bundle: Any = None, extra: dict[str, Any] | None = None) -> Path:
    """Write ``state`` into the new folder ``folder``. ``bundle``: the Task whose preprocessing
    (tokenizer, image normalisation, CTR vocabularies) and data record are saved with the model,
    so the folder serves raw inputs on its own."""
    folder.mkdir(parents=True, exist_ok=True)
    if any(folder.iterdir()):
        raise ModelError(f"{folder} is not empty; a model is saved into a new folder.")
    fmt = formats.get(state.format)
    recorded = fmt.save(state, folder)
    save_file({n: t.contiguous() for n, t in zip(input_names, examples)}, str(folder / EXAMPLES))
    meta = {"slimcart_version": __version__, "format": state.format, "weights": fmt.weights,
            "encoding": {"scheme": "dense"}, **recorded,
            "model": state.spec, "quant": state.quant, "task": task,
            "inputs": list(input_names), "stages": stages or [], **(extra or {})}
    if bundle is not None:
        from .serving.bundle import write_bundle_files

        meta.update(write_bundle_files(bundle, folder))
    (folder / META).write_text(json.dumps(meta, indent=2))
    return folder


def read_meta(folder: str | Path) -> dict[str, Any]:
    folder = Path(folder)
    meta_path = folder / META
    if not meta_path.is_file():
        raise ModelError(f"{folder} is not a slimcart model folder: {META} is missing.",
                         "Give a folder written by `slimcart train` or `slimcart compress`.")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelError(f"{meta_path} is not valid JSON: {exc}") from None
    if not isinstance(meta, dict):
        raise ModelError(f"{meta_path} must hold a JSON object, not a {type(meta).__name__}; the folder is damaged.")
    for key in ("format", "weights", "model"):
        if key not in meta:
            raise ModelError(f"{meta_path} lacks the key {key!r}; the folder is damaged or too old.")
    validate_meta(meta, meta_path)
    return meta


def load(folder: str | Path) -> ModelState:
    """Rebuild the model in ``folder`` with its format's loader (safetensors / ONNX + JSON only)."""
    folder = Path(folder)
    meta = read_meta(folder)
    return formats.get(meta["format"]).load(folder, meta)


def load_examples(folder: str | Path) -> tuple[torch.Tensor, ...]:
    folder = Path(folder)
    meta = read_meta(folder)
    tensors = load_file(str(folder / EXAMPLES))
    return tuple(tensors[n] for n in meta["inputs"])


def size_bytes(folder: str | Path) -> int:
    """Bytes a deployment needs: the weights file and the JSON that rebuilds the model."""
    folder = Path(folder)
    meta = read_meta(folder)
    return (folder / meta["weights"]).stat().st_size + (folder / META).stat().st_size


def bundle_bytes(folder: str | Path) -> int:
    """Bytes of everything serving needs: the model (``size_bytes``) plus the preprocessing files
    (tokenizer, vocabularies, normalisation) saved with it."""
    folder = Path(folder)
    meta = read_meta(folder)
    extra = [folder / f for f in meta.get("serving_files", [])]
    return size_bytes(folder) + sum(f.stat().st_size for f in extra if f.is_file())
