"""Saved models: a folder with the weights, ``slimcart.json`` (what rebuilds the model, how it
was made) and ``examples.safetensors`` (a real input batch, so the model can be benchmarked
alone). Nothing is unpickled on load: safetensors and JSON only."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from . import __version__, storage
from .errors import ModelError
from .models import build
from .registry import ONNX, TORCH, TORCH_INT8
from .stage import ModelState

META = "slimcart.json"
EXAMPLES = "examples.safetensors"
WEIGHTS = {TORCH: "model.safetensors", TORCH_INT8: "model.safetensors", ONNX: "model.onnx"}


def save(state: ModelState, folder: Path, *, task: dict[str, Any], examples: tuple[torch.Tensor, ...],
         input_names: tuple[str, ...], stages: list[dict[str, Any]] | None = None) -> Path:
    """Write ``state`` into the new folder ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    if any(folder.iterdir()):
        raise ModelError(f"{folder} is not empty; a model is saved into a new folder.")
    weights = folder / WEIGHTS[state.format]
    encoding: dict[str, Any] = {"scheme": "dense"}
    if state.format == TORCH:
        tensors = {k: v.detach().contiguous() for k, v in state.torch_model.state_dict().items()}
        tensors, encoding = storage.encode(tensors)
        save_file(tensors, str(weights))
    elif state.format == TORCH_INT8:
        tensors, encoding = storage.encode(_int8_tensors(state.torch_model))
        save_file(tensors, str(weights))
    else:
        shutil.copyfile(state.require_onnx(), weights)
    save_file({n: t.contiguous() for n, t in zip(input_names, examples)}, str(folder / EXAMPLES))
    meta = {"slimcart_version": __version__, "format": state.format, "weights": weights.name,
            "encoding": encoding,
            "model": state.spec, "quant": state.quant, "task": task,
            "inputs": list(input_names), "stages": stages or []}
    (folder / META).write_text(json.dumps(meta, indent=2))
    return folder


def read_meta(folder: str | Path) -> dict[str, Any]:
    folder = Path(folder)
    meta_path = folder / META
    if not meta_path.is_file():
        raise ModelError(f"{folder} is not a slimcart model folder: {META} is missing.",
                         "Give a folder written by `slimcart train` or `slimcart compress`.")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as exc:
        raise ModelError(f"{meta_path} is not valid JSON: {exc}") from None
    for key in ("format", "weights", "model"):
        if key not in meta:
            raise ModelError(f"{meta_path} lacks the key {key!r}; the folder is damaged or too old.")
    return meta


def load(folder: str | Path) -> ModelState:
    """Rebuild the model in ``folder`` (architecture from the spec, weights from safetensors)."""
    folder = Path(folder)
    meta = read_meta(folder)
    weights = folder / meta["weights"]
    if not weights.is_file():
        raise ModelError(f"{weights} is missing.")
    fmt = meta["format"]
    if fmt == ONNX:
        return ModelState(format=ONNX, spec=meta["model"], onnx_path=weights, quant=meta.get("quant", {}))
    model = build(meta["model"])
    try:
        tensors = load_file(str(weights))
    except Exception as exc:  # safetensors raises its own error types for damaged files
        raise ModelError(f"Cannot read {weights}: {exc}") from None
    try:
        tensors = storage.decode(tensors, meta.get("encoding"))
    except (KeyError, ValueError, RuntimeError) as exc:
        raise ModelError(f"{weights}: the stored encoding cannot be decoded: {exc}") from None
    if fmt == TORCH:
        _load_strict(model, tensors, weights)
        return ModelState.from_module(model, meta["model"])
    if fmt == TORCH_INT8:
        from .quantize.dynamic import quantize_like

        qmodel = quantize_like(model, meta["quant"])
        _restore_int8(qmodel, tensors, weights)
        return ModelState(format=TORCH_INT8, spec=meta["model"], torch_model=qmodel.eval(),
                          quant=meta["quant"])
    raise ModelError(f"{folder}: unknown model format {fmt!r}.")


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


def _load_strict(model: torch.nn.Module, tensors: dict[str, torch.Tensor], source: Path) -> None:
    own = model.state_dict()
    missing = [k for k in own if k not in tensors]
    unexpected = [k for k in tensors if k not in own]
    bad = [k for k in own if k in tensors and own[k].shape != tensors[k].shape]
    if missing or unexpected or bad:
        raise ModelError(f"{source} does not match its architecture: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}, wrong shape {bad[:3]}.")
    model.load_state_dict(tensors)


def _int8_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    from torch.ao.nn.quantized.dynamic import Linear as QLinear

    out: dict[str, torch.Tensor] = {}
    qnames = set()
    for name, mod in model.named_modules():
        if isinstance(mod, QLinear):
            qnames.add(name)
            w, b = mod._weight_bias()
            out[f"{name}.weight.int8"] = w.int_repr().contiguous()
            if w.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
                out[f"{name}.weight.scale"] = w.q_per_channel_scales().float().contiguous()
                out[f"{name}.weight.zero_point"] = w.q_per_channel_zero_points().to(torch.int32).contiguous()
            else:
                out[f"{name}.weight.scale"] = torch.tensor([w.q_scale()], dtype=torch.float32)
                out[f"{name}.weight.zero_point"] = torch.tensor([w.q_zero_point()], dtype=torch.int32)
            if b is not None:
                out[f"{name}.bias"] = b.detach().contiguous()
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        out[name] = t.detach().contiguous()
    return out


def _restore_int8(model: torch.nn.Module, tensors: dict[str, torch.Tensor], source: Path) -> None:
    from torch.ao.nn.quantized.dynamic import Linear as QLinear

    float_part = {k: v for k, v in tensors.items() if ".weight." not in k}
    for name, mod in model.named_modules():
        if not isinstance(mod, QLinear):
            continue
        try:
            q, scale, zp = (tensors[f"{name}.weight.{s}"] for s in ("int8", "scale", "zero_point"))
        except KeyError:
            raise ModelError(f"{source}: quantized layer {name} has no stored int8 weight.") from None
        if scale.numel() > 1:
            w = torch._make_per_channel_quantized_tensor(q, scale.double(), zp.long(), 0)
        else:
            w = torch._make_per_tensor_quantized_tensor(q, float(scale), int(zp))
        mod.set_weight_bias(w, float_part.pop(f"{name}.bias", None))
    own = dict(model.named_parameters()) | dict(model.named_buffers())
    for k, v in float_part.items():
        if k not in own:
            raise ModelError(f"{source}: unexpected tensor {k}.")
        with torch.no_grad():
            own[k].copy_(v)
