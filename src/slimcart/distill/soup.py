"""A uniform model soup (Wortsman et al. 2022) of students distilled from the same start with
different seeds: the float parameters and buffers are averaged into the first student, then its
BatchNorm statistics are recomputed on the training split (averaged weights do not produce the
averaged activations). As ``torch.optim.swa_utils.update_bn``, but for models of several inputs,
without gradients, and with only the BatchNorm layers in training mode (dropout stays off)."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import ModelError

BN_BATCH = 64


def average_into(model: nn.Module, others: list[nn.Module], task, vals: list[dict]) -> dict[str, Any]:
    """Average ``others`` into ``model`` in place; returns the students' and the soup's validation scores."""
    state = model.state_dict()
    got = [o.state_dict() for o in others]
    for key, value in state.items():
        if not value.is_floating_point():
            continue  # e.g. BatchNorm's num_batches_tracked
        for g in got:
            if key not in g or g[key].shape != value.shape:
                raise ModelError(f"distill soup: the students differ at {key}; they must share one architecture.",
                                 "Set soup: 1.")
        value.copy_(torch.stack([value] + [g[key] for g in got]).mean(0))
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if norms:
        recompute_bn(model, norms, task)
    m = task.primary_metric
    return {"students_val": [v[m] for v in vals], "val": task.evaluate(model, "val"),
            "batchnorm_recomputed": len(norms)}


def recompute_bn(model: nn.Module, norms: list[nn.Module], task) -> None:
    """BatchNorm running statistics as the cumulative average over the training split."""
    model.eval()
    momenta = [bn.momentum for bn in norms]
    for bn in norms:
        bn.reset_running_stats()
        bn.momentum = None
        bn.train()
    try:
        with torch.no_grad():
            for x, _ in task.batches("train", BN_BATCH):
                model(*x)
    finally:
        for bn, mom in zip(norms, momenta):
            bn.momentum = mom
        model.eval()
