"""Dynamic INT8 quantization in PyTorch eager: int8 weights, activations quantized per batch
at run time (torch.ao.quantization.quantize_dynamic). Linear layers only."""
from __future__ import annotations

import fnmatch
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.ao.nn.quantized.dynamic import Linear as QLinear

from ..errors import ModelError
from ..registry import TORCH, TORCH_INT8, TechniqueConfig, register
from ..stage import ModelState, StageContext, StageReport


class Int8DynamicConfig(TechniqueConfig):
    per_channel: bool = True
    exclude: list[str] = []  # module-name patterns (fnmatch) to keep in float


def _qconfig_spec(model: nn.Module, quant: dict[str, Any]) -> dict[str, Any]:
    from torch.ao.quantization import default_dynamic_qconfig, per_channel_dynamic_qconfig

    qconfig = per_channel_dynamic_qconfig if quant["per_channel"] else default_dynamic_qconfig
    return {name: qconfig for name in quant["layers"]}


def quantize_like(model: nn.Module, quant: dict[str, Any]) -> nn.Module:
    """Quantize ``model`` exactly as recorded in ``quant`` (used by the artifact loader)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(model.eval(), _qconfig_spec(model, quant),
                                                      dtype=torch.qint8)


@register("int8_dynamic", Int8DynamicConfig, accepts=(TORCH,), produces=TORCH_INT8,
          summary="dynamic INT8 (PyTorch eager): int8 Linear weights, activations per batch")
def int8_dynamic(state: ModelState, cfg: Int8DynamicConfig, ctx: StageContext) -> StageReport:
    report = StageReport("int8_dynamic", cfg.model_dump())
    for pat in cfg.exclude:
        if not any(fnmatch.fnmatchcase(n, pat) for n, _ in state.torch_model.named_modules()):
            from ..errors import UsageError
            raise UsageError(f"int8_dynamic.exclude: pattern {pat!r} matches no layer of the model.",
                             "List layer names with `slimcart inspect MODEL_DIR`.")
    layers = []
    for name, mod in state.torch_model.named_modules():
        if isinstance(mod, nn.Linear):
            if any(fnmatch.fnmatchcase(name, p) for p in cfg.exclude):
                report.skipped[name] = "excluded by pattern"
            else:
                layers.append(name)
                report.changed[name] = f"Linear {mod.in_features}x{mod.out_features} -> int8 weights"
        elif isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding, nn.EmbeddingBag)):
            report.skipped[name] = (f"{type(mod).__name__}: PyTorch dynamic quantization covers Linear "
                                    "layers only; use ort_int8_dynamic after onnx_export")
    quant = {"scheme": "dynamic", "per_channel": cfg.per_channel, "layers": layers}
    state.torch_model = quantize_like(state.torch_model, quant)
    state.format, state.quant = TORCH_INT8, quant
    report.stats = {"quantized_layers": len(layers)}
    return report


def int8_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
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


def restore_int8(model: torch.nn.Module, tensors: dict[str, torch.Tensor], source: Path) -> None:
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
