"""Gradual magnitude pruning with fine-tuning in between (iterative prune-retrain).

The target sparsity follows the cubic schedule of Zhu & Gupta (2017),
``s_t = s_f + (s_i - s_f) * (1 - t / n) ** 3`` for pruning steps ``t = 1..n``, so most weights
go early, while the network still has capacity to recover, and the last step reaches ``s_f``.
After each step the task fine-tunes the model with the keep-masks re-applied after every
optimizer step: a pruned weight stays exactly zero, and zeros only accumulate.
"""
from __future__ import annotations

import json
from typing import Any

import torch
from pydantic import Field
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from ..errors import UsageError
from ..registry import TORCH, TechniqueConfig, register
from ..stage import ModelState, StageContext, StageReport
from .magnitude import LayerType, MagnitudePruneConfig, Scope, prune_masks, select_layers

Masks = dict[str, torch.Tensor]


class GradualPruneConfig(TechniqueConfig):
    final_sparsity: float = Field(ge=0.0, lt=1.0)
    initial_sparsity: float = Field(default=0.0, ge=0.0, lt=1.0)
    steps: int = Field(default=4, ge=1)
    epochs_per_step: float = Field(default=0.5, gt=0)
    final_epochs: float = Field(default=0.0, ge=0)
    lr: float | None = Field(default=None, gt=0)   # fine-tuning lr; the task's own when None
    scope: Scope = "layer"
    layer_types: list[LayerType] = ["Linear", "Conv2d"]
    include: list[str] = ["*"]
    exclude: list[str] = []

    def model_post_init(self, _ctx) -> None:
        if self.initial_sparsity > self.final_sparsity:
            raise ValueError("initial_sparsity must not exceed final_sparsity")

    def magnitude(self, sparsity: float) -> MagnitudePruneConfig:
        return MagnitudePruneConfig(sparsity=sparsity, scope=self.scope, layer_types=self.layer_types,
                                    include=self.include, exclude=self.exclude)


def cubic_schedule(initial: float, final: float, steps: int) -> list[float]:
    """Target sparsity after each of the ``steps`` pruning steps (the last one is ``final``)."""
    return [final + (initial - final) * (1.0 - t / steps) ** 3 for t in range(1, steps + 1)]


def apply_masks(layers: dict[str, nn.Module], masks: Masks) -> None:
    with torch.no_grad():
        for n, m in layers.items():
            m.weight.masked_fill_(~masks[n], 0.0)


def sparsity_counts(layers: dict[str, nn.Module]) -> tuple[dict[str, float], int, int]:
    """Per-layer fraction of exact zeros, and total zeros / weights over the layers."""
    per, zeros, total = {}, 0, 0
    for n, m in layers.items():
        z = int((m.weight == 0).sum())
        per[n] = z / m.weight.numel()
        zeros, total = zeros + z, total + m.weight.numel()
    return per, zeros, total


def finetune_masked(ctx: StageContext, model: nn.Module, layers: dict[str, nn.Module], masks: Masks,
                    epochs: float, lr: float | None, seed: int, desc: str) -> dict[str, Any]:
    """Fine-tune on the task with the masks held fixed; returns the training record."""
    if ctx.task is None:
        raise UsageError("fine-tuning a pruned model needs a task (data to train on).")
    update: dict[str, Any] = {"epochs": epochs}
    if lr is not None:
        update["lr"] = lr
    base = ctx.task.train_config("full")
    cfg = base.model_copy(update={**update, "seed": base.seed + seed})
    return ctx.task.train_model(model, cfg, progress=ctx.progress, desc=desc,
                                after_step=lambda _m: apply_masks(layers, masks),
                                **ctx.train_checkpoint(f"finetune{seed}"))


def _checkpoint(folder, tag: str, model: nn.Module, info: dict[str, Any]) -> None:
    tensors = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(tensors, str(folder / f"{tag}.safetensors"))
    (folder / f"{tag}.json").write_text(json.dumps({**info, "weights": f"{tag}.safetensors"}, indent=2))


@register("gradual_prune", GradualPruneConfig, accepts=(TORCH,),
          summary="magnitude pruning on a cubic schedule, fine-tuning between steps")
def gradual_prune(state: ModelState, cfg: GradualPruneConfig, ctx: StageContext) -> StageReport:
    if ctx.task is None:
        raise UsageError("gradual_prune fine-tunes between steps and needs a task.")
    report = StageReport("gradual_prune", cfg.model_dump())
    model = state.torch_model
    layers = select_layers(model, cfg.magnitude(cfg.final_sparsity), report)
    task, metric = ctx.task, ctx.task.primary_metric
    folder = ctx.keep("gradual")
    before = task.evaluate(model, "val")[metric]
    masks: Masks | None = None
    schedule = []
    targets = cubic_schedule(cfg.initial_sparsity, cfg.final_sparsity, cfg.steps)
    bar = tqdm(list(enumerate(targets, 1)), desc="gradual prune", unit="step", leave=False,
               disable=True if not ctx.progress else None)
    for step, target in bar:
        new = prune_masks(layers, cfg.magnitude(target))
        masks = new if masks is None else {n: new[n] & masks[n] for n in layers}
        apply_masks(layers, masks)
        record = finetune_masked(ctx, model, layers, masks, cfg.epochs_per_step, cfg.lr, step,
                                 f"fine-tune step {step}/{cfg.steps}")
        _, zeros, total = sparsity_counts(layers)
        entry = {"step": step, "target_sparsity": target, "achieved_sparsity": zeros / total,
                 "val_metric": record["val"][metric]}
        schedule.append(entry)
        _checkpoint(folder, f"step-{step:02d}", model, {**entry, "metric": metric, "val": record["val"]})
        bar.set_postfix(sparsity=f"{zeros / total:.3f}", **{metric: f"{entry['val_metric']:.4f}"})
    bar.close()
    after = schedule[-1]["val_metric"]
    if cfg.final_epochs > 0:
        record = finetune_masked(ctx, model, layers, masks, cfg.final_epochs, cfg.lr, cfg.steps + 1,
                                 "final fine-tune")
        after = record["val"][metric]
        _, zeros, total = sparsity_counts(layers)
        _checkpoint(folder, "final", model, {"step": "final", "achieved_sparsity": zeros / total,
                                             "metric": metric, "val_metric": after, "val": record["val"]})
    per, zeros, total = sparsity_counts(layers)
    for n, s in per.items():
        report.changed[n] = f"sparsity {s:.4f}"
    report.stats = {"sparsity": zeros / total, "pruned_weights": zeros, "weights_in_scope": total,
                    "layers": len(layers), "metric": metric, "val_before": before, "val_after": after,
                    "schedule": schedule, "checkpoints": f"checkpoints/{folder.name}"}
    return report
