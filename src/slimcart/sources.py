"""What a ``--model`` value is: a slimcart folder, a Hugging Face folder, an ONNX file, a
torchvision/timm architecture with a safetensors state dict, or an nn.Module (Python API)."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import ModelError, UsageError

ACCEPTED = ("Accepted models:\n"
            "  - a slimcart model folder (with slimcart.json)\n"
            "  - a Hugging Face folder: config.json, model.safetensors and the tokenizer files\n"
            "  - an ONNX file (*.onnx)\n"
            "  - torchvision:NAME or timm:NAME with weights (a state_dict saved as .safetensors)\n"
            "  - an nn.Module (Python API) with example_inputs")


@dataclass
class Source:
    kind: str                      # slimcart | hf | onnx | zoo | module
    format: str                    # torch | onnx (a slimcart folder: the format it was saved in)
    description: str
    model: nn.Module | None = None
    onnx_path: Path | None = None
    path: Path | None = None       # the folder or file given
    spec: dict[str, Any] = field(default_factory=dict)
    task_options: dict[str, Any] = field(default_factory=dict)
    input_names: tuple[str, ...] = ()
    output_name: str | None = None


def _image_options(model: nn.Module) -> dict[str, Any]:
    """Input channels (first Conv2d) and the input size of fixed-size models (ViT...), if known."""
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    opts: dict[str, Any] = {"channels": conv.in_channels} if conv is not None else {}
    fixed = getattr(model, "pretrained_cfg", {}) or {}
    size = fixed.get("input_size", [None])[-1] if fixed.get("fixed_input_size") else getattr(model, "image_size", None)
    if isinstance(size, int):
        opts["image_size"] = size
    return opts


def _onnx(path: Path) -> Source:
    try:
        import onnx
    except ImportError:
        raise ModelError("ONNX models need the onnx package.", "Install it: pip install onnx") from None
    try:
        onnx.checker.check_model(str(path))
        graph = onnx.load(str(path), load_external_data=False).graph
    except Exception as exc:  # onnx raises decode, validation and OS errors
        raise ModelError(f"{path} is not a valid ONNX model: {type(exc).__name__}: {str(exc)[:300]}",
                         "The file is damaged or incomplete; export it again.") from None
    inits = {i.name for i in graph.initializer}
    inputs = [i for i in graph.input if i.name not in inits]
    if not inputs or not graph.output:
        raise ModelError(f"{path} has no graph inputs or outputs.")
    opts: dict[str, Any] = {}
    dims = [d.dim_value for d in inputs[0].type.tensor_type.shape.dim]
    if len(inputs) == 1 and len(dims) == 4 and dims[1] > 0:
        opts["channels"] = dims[1]
        if dims[2] > 0 and dims[2] == dims[3]:
            opts["image_size"] = dims[2]
    names = tuple(i.name for i in inputs)
    return Source("onnx", "onnx", f"ONNX model {path} (inputs: {', '.join(names)})", onnx_path=path,
                  path=path, spec={"arch": "onnx", "config": {"file": path.name}}, task_options=opts,
                  input_names=names, output_name=graph.output[0].name)


def _module(model: nn.Module, example_inputs) -> Source:
    cls = f"{type(model).__module__}.{type(model).__qualname__}"
    if example_inputs is None:
        raise UsageError(f"An nn.Module ({cls}) needs example_inputs to be checked.",
                         "Pass example_inputs=(tensor, ...) as the task feeds them, e.g. (pixels,) or "
                         "(input_ids, attention_mask).")
    example = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    was_training = model.training
    try:
        with torch.no_grad():
            out = model.eval()(*example)
    except Exception as exc:  # any error of user code
        raise UsageError(f"{cls} fails on the example inputs: {type(exc).__name__}: {str(exc)[:300]}") from None
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor):
        what = f"a {type(out).__name__}" + (f" of {len(out)} items" if isinstance(out, (tuple, list, dict)) else "")
        raise UsageError(f"{cls} returned {what}; slimcart needs forward() to return one logits tensor.",
                         "Wrap the model in an nn.Module whose forward returns the tensor "
                         "(e.g. `return self.model(x).logits` or `[0]`).")
    opts: dict[str, Any] = {}
    if len(example) == 1 and example[0].ndim == 4 and example[0].is_floating_point():
        n, c, h, w = example[0].shape
        opts = {"channels": int(c), **({"image_size": int(h)} if h == w else {})}
    return Source("module", "torch", f"Python module {cls}", model=model,
                  spec={"arch": "module", "config": {"class": cls}}, task_options=opts)


def resolve_source(value: str | Path | nn.Module, *, weights: str | Path | None = None,
                   example_inputs=None) -> Source:
    """Decide what ``value`` is and load it (a slimcart folder is only checked: load it with
    ``slimcart.artifact.load``)."""
    if isinstance(value, nn.Module):
        return _module(value, example_inputs)
    if not isinstance(value, (str, Path)):
        raise UsageError(f"Cannot use a {type(value).__name__} as a model.", ACCEPTED)
    path = Path(value)
    text = str(value)
    if not path.exists() and text.split(":", 1)[0] in ("torchvision", "timm"):
        from .models.zoo import load_zoo

        if weights is None:
            raise UsageError(f"{text} needs weights: a state_dict saved with safetensors.",
                             "e.g. safetensors.torch.save_file(model.state_dict(), 'weights.safetensors')")
        model, spec = load_zoo(text, weights)
        return Source("zoo", "torch", f"{text} ({spec['config']['num_classes']} classes) with weights "
                      f"from {weights}", model=model, path=Path(weights), spec=spec,
                      task_options=_image_options(model))
    if weights is not None:
        raise UsageError("weights is only used with torchvision:NAME or timm:NAME models.", ACCEPTED)
    if not path.exists():
        raise UsageError(f"Model {text!r} does not exist.", ACCEPTED)
    if path.is_dir() and (path / "slimcart.json").is_file():
        try:
            fmt = json.loads((path / "slimcart.json").read_text()).get("format", "torch")
        except (json.JSONDecodeError, AttributeError):
            raise ModelError(f"{path / 'slimcart.json'} is not valid JSON.") from None
        return Source("slimcart", fmt, f"slimcart model folder {path}", path=path, task_options=_bundle_options(path))
    if path.is_dir() and (path / "config.json").is_file():
        from .models.hf import load_hf_folder

        model, spec, info = load_hf_folder(path)
        opts = {k: info[k] for k in ("tokenizer", "max_length", "num_labels", "id2label")}
        return Source("hf", "torch", f"Hugging Face {info['model_type']} classifier ({info['num_labels']} "
                      f"labels) from {path}", model=model, path=path, spec=spec, task_options=opts,
                      input_names=("input_ids", "attention_mask"), output_name="logits")
    if path.is_file() and path.suffix.lower() == ".onnx":
        return _onnx(path)
    if path.suffix.lower() in (".pt", ".pth", ".bin", ".ckpt", ".pkl"):
        raise UsageError(f"{path} is a pickled checkpoint; slimcart loads no pickle.",
                         "Save model.state_dict() with safetensors and give torchvision:NAME or timm:NAME "
                         "with it as weights, or pass the nn.Module in Python. " + ACCEPTED)
    raise UsageError(f"Cannot tell what kind of model {path} is.", ACCEPTED)


def check_onnx_inputs(source: Source, expected: tuple[str, ...]) -> None:
    """An ONNX model must take exactly the task's inputs (fed by name; order does not matter)."""
    if source.format == "onnx" and source.input_names and set(source.input_names) != set(expected):
        raise UsageError(f"The ONNX model's inputs ({', '.join(source.input_names)}) do not match the "
                         f"task's inputs ({', '.join(expected)}).",
                         "Export the model with input_names set to the task's input names.")


def _bundle_options(folder: Path) -> dict[str, Any]:
    """Task options a saved bundle fixes: its own tokenizer, its image size and normalisation."""
    opts: dict[str, Any] = {}
    if (folder / "tokenizer").is_dir():
        opts["tokenizer"] = str(folder / "tokenizer")
    try:
        spec = json.loads((folder / "preprocess.json").read_text()).get("spec", {})
    except (OSError, json.JSONDecodeError, AttributeError):
        return opts
    if spec.get("kind") == "image" and spec.get("height"):
        opts["image_size"] = int(spec["height"])
        # the baseline whose normalisation the pixels have (older bundles: the train split's statistics)
        opts["baseline"] = spec.get("normalised_for", "resnet_small")
    return opts
