"""Layer sensitivity: prune one layer at a time to several sparsities and score the task, then
give each layer the highest sparsity whose metric drop stays within a budget."""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from pydantic import Field
from torch import nn

from ..errors import UsageError
from ..registry import TORCH, TechniqueConfig, register
from ..stage import ModelState, StageContext, StageReport
from .gradual import apply_masks, sparsity_counts
from .magnitude import LayerType, MagnitudePruneConfig, prune_masks, select_layers

DEFAULT_SPARSITIES = (0.25, 0.5, 0.75, 0.9)


def _prune_one(layer: nn.Module, name: str, sparsity: float) -> None:
    masks = prune_masks({name: layer}, MagnitudePruneConfig(sparsity=sparsity))
    apply_masks({name: layer}, masks)


def sensitivity_scan(model: nn.Module, task, sparsities: Sequence[float] = DEFAULT_SPARSITIES,
                     layer_types: Sequence[str] = ("Linear", "Conv2d"), include: Sequence[str] = ("*",),
                     exclude: Sequence[str] = (), split: str = "val",
                     limit: int | None = None) -> dict[str, Any]:
    """Score the task with each selected layer pruned alone to each sparsity.

    The model is left as it was. Returns ``{"metric", "higher_is_better", "split", "limit",
    "baseline", "layers": {layer: [{"sparsity", "metric"}, ...]}, "skipped": {layer: why}}``.
    """
    report = StageReport("sensitivity_scan", {})
    sel = MagnitudePruneConfig(sparsity=0.0, layer_types=list(layer_types), include=list(include),
                               exclude=list(exclude))
    layers = select_layers(model, sel, report)
    metric = task.primary_metric
    was_training = model.training
    baseline = task.evaluate(model, split, limit)[metric]
    curves: dict[str, list[dict[str, float]]] = {}
    try:
        for name, layer in layers.items():
            original = layer.weight.detach().clone()
            curve = []
            try:
                for s in sorted(set(sparsities)):
                    _prune_one(layer, name, s)
                    curve.append({"sparsity": float(s), "metric": task.evaluate(model, split, limit)[metric]})
                    with torch.no_grad():
                        layer.weight.copy_(original)
            finally:
                with torch.no_grad():
                    layer.weight.copy_(original)
            curves[name] = curve
    finally:
        model.train(was_training)
    return {"metric": metric, "higher_is_better": bool(task.higher_is_better), "split": split,
            "limit": limit, "baseline": baseline, "layers": curves, "skipped": dict(report.skipped)}


def metric_drop(scan: dict[str, Any], value: float) -> float:
    """How much worse ``value`` is than the scan's unpruned baseline, in metric units."""
    d = scan["baseline"] - value if scan["higher_is_better"] else value - scan["baseline"]
    return math.inf if math.isnan(d) else d


def propose_sparsities(scan: dict[str, Any], max_drop: float) -> dict[str, float]:
    """Per layer, the highest scanned sparsity whose drop is at most ``max_drop`` (0.0 if none)."""
    return {name: max([p["sparsity"] for p in curve if metric_drop(scan, p["metric"]) <= max_drop],
                      default=0.0)
            for name, curve in scan["layers"].items()}


class SensitivityPruneConfig(TechniqueConfig):
    max_drop: float = Field(ge=0.0)
    sparsities: list[float] = list(DEFAULT_SPARSITIES)
    limit: int | None = Field(default=None, ge=1)   # validation rows scored per point
    layer_types: list[LayerType] = ["Linear", "Conv2d"]
    include: list[str] = ["*"]
    exclude: list[str] = []

    def model_post_init(self, _ctx) -> None:
        if not self.sparsities or any(not 0.0 < s < 1.0 for s in self.sparsities):
            raise ValueError("sparsities must be a non-empty list of fractions in (0, 1)")


@register("sensitivity_prune", SensitivityPruneConfig, accepts=(TORCH,),
          summary="per-layer magnitude sparsity chosen by a sensitivity scan within a metric budget")
def sensitivity_prune(state: ModelState, cfg: SensitivityPruneConfig, ctx: StageContext) -> StageReport:
    if ctx.task is None:
        raise UsageError("sensitivity_prune scores the task and needs one.")
    report = StageReport("sensitivity_prune", cfg.model_dump())
    model = state.torch_model
    sel = MagnitudePruneConfig(sparsity=0.0, layer_types=cfg.layer_types, include=cfg.include,
                               exclude=cfg.exclude)
    layers = select_layers(model, sel, report)
    scan = sensitivity_scan(model, ctx.task, cfg.sparsities, cfg.layer_types, cfg.include,
                            cfg.exclude, "val", cfg.limit)
    proposal = propose_sparsities(scan, cfg.max_drop)
    pruned = {}
    for name, s in proposal.items():
        if s == 0.0:
            report.skipped[name] = f"every scanned sparsity costs more than max_drop={cfg.max_drop}"
        else:
            _prune_one(layers[name], name, s)
            pruned[name] = layers[name]
    per, zeros, total = sparsity_counts(layers)
    for name in pruned:
        report.changed[name] = f"sparsity {per[name]:.4f} (proposed {proposal[name]})"
    after = ctx.task.evaluate(model, "val", cfg.limit)[scan["metric"]]
    report.stats = {"sparsity": zeros / total, "pruned_weights": zeros, "weights_in_scope": total,
                    "layers": len(pruned), "metric": scan["metric"], "val_before": scan["baseline"],
                    "val_after": after, "proposal": proposal, "scan": scan}
    return report
