"""Gradient averaging for a model whose tables are sharded and whose other layers are replicated."""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from .sharded import ShardedEmbeddingCollection


def sync_grads(module: nn.Module, group=None) -> None:
    """Average the gradients the way data-parallel training does; call after ``loss.backward()``
    on every rank, where each rank's loss is the mean over its own batch.

    Replicated parameters (MLP, dense layers, bias) are all-reduced and divided by the world size.
    Each table shard has already received, through the backward all-to-all, the gradients from
    every rank's ids (their sum), so it is divided by the world size. An optimizer step then
    equals the step of the unsharded model on the mean of the ranks' losses."""
    world = dist.get_world_size(group)
    sharded = {id(p) for m in module.modules() if isinstance(m, ShardedEmbeddingCollection)
               for p in m.parameters()}
    replicated = []
    for p in module.parameters():
        if not p.requires_grad:
            continue
        if id(p) in sharded:
            if p.grad is not None:
                p.grad.div_(world)
            continue
        if p.grad is None:  # every rank must put the same number of values into the all-reduce
            p.grad = torch.zeros_like(p)
        replicated.append(p)
    if replicated:
        flat = torch.cat([p.grad.reshape(-1) for p in replicated])
        dist.all_reduce(flat, group=group)
        flat.div_(world)
        for p, g in zip(replicated, flat.split([p.numel() for p in replicated])):
            p.grad.copy_(g.view_as(p))
