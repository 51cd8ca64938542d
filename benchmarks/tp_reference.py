"""Torch-Pruning's own pruner, called the way its README shows, as a reference in the same run.

Registered from the benchmark (not shipped): ``tp_magnitude_pruner`` runs
``tp.pruner.MagnitudePruner`` with L2 magnitude importance on the baseline, keeps the output
layer, then optionally fine-tunes with the same trainer and budget as slimcart's own
``channel_prune``, so the two differ only in how channels are chosen and pruned. The result is
recorded like any structured-pruned model (architecture spec + safetensors), so it is reloaded
and measured in the same process as every other variant."""
from __future__ import annotations

import torch
import torch_pruning as tp
from pydantic import Field

from slimcart.prune.structured import count, finish
from slimcart.registry import TORCH, TechniqueConfig, register
from slimcart.stage import StageReport


class TPMagnitudeConfig(TechniqueConfig):
    ratio: float = Field(ge=0.0, lt=1.0)
    finetune_epochs: float = Field(default=0.0, ge=0.0)
    round_to: int | None = Field(default=None, ge=1)


@register("tp_magnitude_pruner", TPMagnitudeConfig, accepts=(TORCH,),
          summary="reference: torch_pruning.pruner.MagnitudePruner as its README uses it")
def tp_magnitude_pruner(state, cfg: TPMagnitudeConfig, ctx) -> StageReport:
    report = StageReport("tp_magnitude_pruner", cfg.model_dump())
    model = state.torch_model.eval()
    example = ctx.task.example_inputs(1, "val")
    last = [m for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))][-1]
    before = count(model, example)
    with torch.no_grad():
        out_shape = tuple(model(*example).shape)
    pruner = tp.pruner.MagnitudePruner(model, example, importance=tp.importance.MagnitudeImportance(p=2),
                                       pruning_ratio=cfg.ratio, ignored_layers=[last], round_to=cfg.round_to,
                                       forward_fn=lambda m, x: m(*x))
    pruner.step()
    # the same shape check, fine-tuning, reshape record and MAC/param stats as channel_prune
    finish(state, ctx, report, before, example, out_shape, cfg.finetune_epochs)
    return report


def recipe(name: str, ratio: float, finetune_epochs: float, measure: dict, round_to: int | None = None):
    from slimcart.recipe import Recipe

    return Recipe.from_dict({"name": name, "description": "Torch-Pruning MagnitudePruner (reference)",
                             "stages": [{"type": "tp_magnitude_pruner", "ratio": ratio, "round_to": round_to,
                                         "finetune_epochs": finetune_epochs}], "measure": measure})
