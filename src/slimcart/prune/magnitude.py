"""Unstructured magnitude pruning: zero the weights of smallest magnitude, by an absolute
threshold (the classic ``where(|w| > t, w, 0)``) or to a target sparsity (per layer or global)."""
from __future__ import annotations

import fnmatch
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from ..errors import UsageError
from ..registry import TORCH, TechniqueConfig, register
from ..stage import ModelState, StageContext, StageReport

LAYER_TYPES = {"Linear": nn.Linear, "Conv1d": nn.Conv1d, "Conv2d": nn.Conv2d,
               "Embedding": nn.Embedding}
LayerType = Literal["Linear", "Conv1d", "Conv2d", "Embedding"]
Scope = Literal["layer", "global"]


class MagnitudePruneConfig(TechniqueConfig):
    sparsity: float | None = Field(default=None, ge=0.0, lt=1.0)
    threshold: float | None = Field(default=None, ge=0.0)
    scope: Scope = "layer"
    layer_types: list[LayerType] = ["Linear", "Conv2d"]
    include: list[str] = ["*"]                 # module-name patterns (fnmatch)
    exclude: list[str] = []

    def model_post_init(self, _ctx) -> None:
        if (self.sparsity is None) == (self.threshold is None):
            raise ValueError("give exactly one of sparsity (fraction in [0, 1)) or threshold")


def select_layers(model: nn.Module, cfg: MagnitudePruneConfig, report: StageReport) -> dict[str, nn.Module]:
    """Layers to prune; every other weighted layer is listed as skipped with the reason."""
    names = [n for n, _ in model.named_modules() if n]
    for pat in cfg.include + cfg.exclude:
        if not any(fnmatch.fnmatchcase(n, pat) for n in names):
            raise UsageError(f"magnitude_prune: layer pattern {pat!r} matches no layer.",
                             f"Layer names look like: {', '.join(names[:6])} ...")
    types = tuple(LAYER_TYPES[t] for t in cfg.layer_types)
    chosen: dict[str, nn.Module] = {}
    for name, mod in model.named_modules():
        if not isinstance(getattr(mod, "weight", None), torch.Tensor) or not name:
            continue
        if not isinstance(mod, types):
            if isinstance(mod, tuple(LAYER_TYPES.values())):
                report.skipped[name] = f"{type(mod).__name__} not in layer_types"
            continue
        if not any(fnmatch.fnmatchcase(name, p) for p in cfg.include):
            report.skipped[name] = "not matched by include"
        elif any(fnmatch.fnmatchcase(name, p) for p in cfg.exclude):
            report.skipped[name] = "excluded by pattern"
        else:
            chosen[name] = mod
    if not chosen:
        raise UsageError("magnitude_prune: no layer selected; check layer_types, include and exclude.")
    return chosen


def kth_magnitude(values: torch.Tensor, sparsity: float) -> float:
    """The magnitude below or at which ``sparsity`` of ``values`` lie."""
    k = int(round(sparsity * values.numel()))
    if k == 0:
        return -1.0
    return float(values.abs().flatten().kthvalue(k).values)


def prune_masks(layers: dict[str, nn.Module], cfg: MagnitudePruneConfig) -> dict[str, torch.Tensor]:
    """Keep-masks per layer. Ties at the threshold are broken by position so that the
    achieved sparsity equals the target to the weight."""
    masks = {}
    if cfg.threshold is not None:
        return {n: m.weight.detach().abs() > cfg.threshold for n, m in layers.items()}
    if cfg.scope == "global":
        flat = torch.cat([m.weight.detach().abs().flatten() for m in layers.values()])
        k = int(round(cfg.sparsity * flat.numel()))
        keep = torch.ones_like(flat, dtype=torch.bool)
        keep[flat.argsort(stable=True)[:k]] = False
        offset = 0
        for n, m in layers.items():
            masks[n] = keep[offset:offset + m.weight.numel()].view_as(m.weight)
            offset += m.weight.numel()
        return masks
    for n, m in layers.items():
        w = m.weight.detach().abs().flatten()
        k = int(round(cfg.sparsity * w.numel()))
        keep = torch.ones_like(w, dtype=torch.bool)
        keep[w.argsort(stable=True)[:k]] = False
        masks[n] = keep.view_as(m.weight)
    return masks


@register("magnitude_prune", MagnitudePruneConfig, accepts=(TORCH,),
          summary="zero the smallest-magnitude weights (threshold or target sparsity)")
def magnitude_prune(state: ModelState, cfg: MagnitudePruneConfig, ctx: StageContext) -> StageReport:
    report = StageReport("magnitude_prune", cfg.model_dump())
    layers = select_layers(state.torch_model, cfg, report)
    masks = prune_masks(layers, cfg)
    zeros = total = 0
    with torch.no_grad():
        for n, m in layers.items():
            m.weight.mul_(masks[n].to(m.weight.dtype))
            z = int((m.weight == 0).sum())
            zeros, total = zeros + z, total + m.weight.numel()
            report.changed[n] = f"sparsity {z / m.weight.numel():.4f}"
    report.stats = {"sparsity": zeros / total, "pruned_weights": zeros, "weights_in_scope": total,
                    "layers": len(layers)}
    return report
