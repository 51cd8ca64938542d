"""Dynamic INT8 quantization in PyTorch eager: int8 weights, activations quantized per batch
at run time (torch.ao.quantization.quantize_dynamic). Linear layers only."""
from __future__ import annotations

import fnmatch
import warnings
from typing import Any

import torch
from torch import nn

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
