"""Model formats, registered by name like techniques: a format knows how to write its weights
into a model folder, how to load them back, which runtimes serve it as it is, and into which
other format it can be converted for a runtime that cannot (a float PyTorch model is exported to
ONNX for ONNX Runtime; the converted artifact is saved too, so that what is timed is what is
shipped). Adding fp16, a QDQ graph or a compiled module is one new ``register_format`` call.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file

from . import storage
from .errors import ModelError, closest
from .registry import ONNX, TORCH, TORCH_INT8
from .stage import ModelState


@dataclass(frozen=True)
class Format:
    name: str
    weights: str                                   # file name inside the model folder
    save: Callable[[ModelState, Path], dict]       # writes the weights; returns what slimcart.json records
    load: Callable[[Path, dict], ModelState]       # folder, meta -> state
    serves: tuple[str, ...]                        # runtime families that serve it as it is
    convert: dict[str, str] = field(default_factory=dict)  # runtime family -> format it is converted to
    summary: str = ""


_FORMATS: dict[str, Format] = {}


def register_format(fmt: Format) -> Format:
    _FORMATS[fmt.name] = fmt
    return fmt


def formats() -> dict[str, Format]:
    from .registry import techniques

    techniques()
    return dict(_FORMATS)


def get(name: str) -> Format:
    if name not in _FORMATS:
        # formats made by techniques register when their module is imported
        from .registry import techniques

        techniques()
    if name not in _FORMATS:
        raise ModelError(f"Unknown model format {name!r}.{closest(str(name), list(_FORMATS))}",
                         f"Known formats: {', '.join(_FORMATS)}.")
    return _FORMATS[name]


# ---- float PyTorch: state dict in safetensors, sparse tensors encoded exactly -------------------

def _read_tensors(path: Path, meta: dict) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ModelError(f"{path} is missing.")
    try:
        tensors = load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types for damaged files
        raise ModelError(f"Cannot read {path}: {exc}") from None
    try:
        return storage.decode(tensors, meta.get("encoding"))
    except (KeyError, ValueError, RuntimeError) as exc:
        raise ModelError(f"{path}: the stored encoding cannot be decoded: {exc}") from None


def _save_torch(state: ModelState, folder: Path) -> dict:
    tensors = {k: v.detach().contiguous() for k, v in state.torch_model.state_dict().items()}
    tensors, encoding = storage.encode(tensors)
    save_file(tensors, str(folder / "model.safetensors"))
    return {"encoding": encoding}


def _load_torch(folder: Path, meta: dict) -> ModelState:
    from .models import build
    from .models.registry import load_strict

    path = folder / meta["weights"]
    model = build(meta["model"])
    load_strict(model, _read_tensors(path, meta), str(path))
    return ModelState.from_module(model, meta["model"])


# ---- eager dynamic INT8: int8 weights + scales in safetensors, rebuilt on load ------------------

def _save_int8(state: ModelState, folder: Path) -> dict:
    from .quantize.dynamic import int8_tensors

    tensors, encoding = storage.encode(int8_tensors(state.torch_model))
    save_file(tensors, str(folder / "model.safetensors"))
    return {"encoding": encoding}


def _load_int8(folder: Path, meta: dict) -> ModelState:
    from .models import build
    from .quantize.dynamic import quantize_like, restore_int8

    path = folder / meta["weights"]
    qmodel = quantize_like(build(meta["model"]), meta["quant"])
    restore_int8(qmodel, _read_tensors(path, meta), path)
    return ModelState(format=TORCH_INT8, spec=meta["model"], torch_model=qmodel.eval(), quant=meta["quant"])


# ---- ONNX graph ------------------------------------------------------------------------------

def _save_onnx(state: ModelState, folder: Path) -> dict:
    shutil.copyfile(state.require_onnx(), folder / "model.onnx")
    return {}


def _load_onnx(folder: Path, meta: dict) -> ModelState:
    path = folder / meta["weights"]
    if not path.is_file():
        raise ModelError(f"{path} is missing.")
    return ModelState(format=ONNX, spec=meta["model"], onnx_path=path, quant=meta.get("quant", {}))


register_format(Format(TORCH, "model.safetensors", _save_torch, _load_torch, serves=("torch",),
                       convert={"onnxruntime": ONNX}, summary="float PyTorch module (safetensors)"))
register_format(Format(TORCH_INT8, "model.safetensors", _save_int8, _load_int8, serves=("torch",),
                       summary="PyTorch module with dynamic-INT8 Linear layers (not exportable to ONNX)"))
register_format(Format(ONNX, "model.onnx", _save_onnx, _load_onnx, serves=("onnxruntime",),
                       summary="ONNX graph (served by ONNX Runtime and OpenVINO)"))


def describe() -> dict[str, Any]:
    return {n: {"weights": f.weights, "serves": list(f.serves), "convert": f.convert, "summary": f.summary}
            for n, f in formats().items()}


def served_state(folder: Path, state: ModelState, family: str, tmp: Path):
    """The model a runtime family serves for the model folder ``folder`` (loaded as ``state``):
    ``(state, bytes on disk, where)``: the folder's own model, the ``served/<family>/`` artifact
    that `compress` saved beside it, or a conversion made into ``tmp`` for this run; None if the
    format can be neither served nor converted there."""
    from . import artifact

    fmt = get(state.format)
    if family in fmt.serves:
        return state, artifact.size_bytes(folder), "this folder"
    saved = Path(folder) / "served" / family
    if (saved / artifact.META).is_file():
        return artifact.load(saved), artifact.size_bytes(saved), f"served/{family}"
    if fmt.convert.get(family) == ONNX:
        from .accelerate.onnx_export import export_onnx

        names = tuple(artifact.read_meta(folder)["inputs"])
        axes = {n: {0: "batch"} for n in names} | {"logits": {0: "batch"}}
        if "input_ids" in names:
            axes.update({n: {0: "batch", 1: "sequence"} for n in names})
        path = export_onnx(state.torch_model, artifact.load_examples(folder), Path(tmp) / "model.onnx", names, axes)
        return ModelState(ONNX, state.spec, onnx_path=path), path.stat().st_size, "converted for this run"
    return None


def runtimes_for(fmt_name: str) -> list[str]:
    """Registered runtimes that can serve a model of this format (as it is or converted)."""
    from .measure.runtimes import runtimes

    fmt = get(fmt_name)
    return [n for n, rt in runtimes().items() if rt.family in fmt.serves or rt.family in fmt.convert]
