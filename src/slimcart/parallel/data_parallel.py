"""Data-parallel steps for ``slimcart.trainer.Trainer`` with plain torch.distributed.

Every rank holds the whole model and walks the same global batches; rank r takes the contiguous
slice ``rows_of(n, world, r)`` of each. A rank's loss is the mean over its slice, scaled by its
share of the global batch's rows before ``backward``, so the sum of the gradients over the ranks
(one all-reduce of the flattened gradients) is the gradient of the mean over the whole batch.
"""
from __future__ import annotations

import hashlib
from functools import reduce

import torch
import torch.distributed as dist
from torch import Tensor, nn


def rows_of(n: int, world: int, rank: int) -> slice:
    """This rank's contiguous part of a global batch of ``n`` rows (sizes differ by at most 1)."""
    return slice(n * rank // world, n * (rank + 1) // world)


def step_seed(seed: int, step: int, rank: int) -> int:
    """A seed for the default RNG at one step on one rank: dropout masks differ between ranks, and a
    resumed run draws the masks of an uninterrupted one."""
    digest = hashlib.blake2b(f"{seed}/{step}/{rank}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def broadcast_module(module: nn.Module) -> None:
    """Give every rank rank 0's parameters and buffers."""
    with torch.no_grad():
        for t in [*module.parameters(), *module.buffers()]:
            dist.broadcast(t.data, 0)


def broadcast_float_buffers(module: nn.Module) -> None:
    """Rank 0's floating-point buffers (e.g. batch-norm running statistics) on every rank, in one
    broadcast, so the replicas stay the same (as DDP's ``broadcast_buffers``)."""
    bufs = [b for b in module.buffers() if b.is_floating_point()]
    if not bufs:
        return
    flat = torch.cat([b.reshape(-1).to(_dtype(bufs)) for b in bufs])
    dist.broadcast(flat, 0)
    with torch.no_grad():
        for b, v in zip(bufs, flat.split([b.numel() for b in bufs])):
            b.copy_(v.view_as(b))


def all_reduce_step(params: list[Tensor], values: Tensor) -> Tensor:
    """Sum the gradients of ``params`` and ``values`` (this rank's share-weighted logged losses)
    over the ranks in one all-reduce; returns the summed values. A parameter keeps ``grad=None``
    only when it has no gradient on any rank (as in one process, where AdamW then skips it)."""
    grads = [p.grad for p in params]
    dtype = _dtype([g for g in grads if g is not None])
    dev = values.device
    parts = [torch.zeros(p.numel(), dtype=dtype, device=dev) if g is None else
             (g.to_dense() if g.is_sparse else g).reshape(-1).to(dev, dtype) for p, g in zip(params, grads)]
    has = torch.tensor([g is not None for g in grads], dtype=dtype, device=dev)
    flat = torch.cat([*parts, has, values.to(dtype)])
    dist.all_reduce(flat)
    sizes = [p.numel() for p in params]
    pieces = flat.split([*sizes, len(params), values.numel()])
    for p, g, seen in zip(params, pieces[:len(params)], pieces[len(params)].tolist()):
        p.grad = g.view_as(p).to(p.device, p.dtype) if seen > 0 else None
    return pieces[-1]


def check_same(numbers: list[int], device: torch.device) -> bool:
    """Whether every rank passed the same numbers."""
    t = torch.tensor([*numbers, *(-n for n in numbers)], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return all(t[i].item() == -t[len(numbers) + i].item() for i in range(len(numbers)))


def _dtype(tensors: list[Tensor]) -> torch.dtype:
    return reduce(torch.promote_types, [t.dtype for t in tensors], torch.float32)
