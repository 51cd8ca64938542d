"""Variable-size all-to-all along dim 0, plain and differentiable (the backward pass sends the
gradients back the way the data came, with the split sizes swapped).

Both gloo (CPU) and nccl implement ``all_to_all_single`` with uneven and zero-size splits, so
no fallback is needed. The differentiable wrapper is defined here because
``torch.distributed.nn.functional.all_to_all_single`` warns that it is deprecated on every call."""
from __future__ import annotations

import torch
import torch.distributed as dist


def exchange(x: torch.Tensor, send_splits: list[int], recv_splits: list[int], group=None) -> torch.Tensor:
    """Send ``x[sum(send_splits[:r]):][:send_splits[r]]`` to rank r; returns what every rank sent
    here, concatenated in rank order (``recv_splits[r]`` rows from rank r). Not differentiable."""
    out = x.new_empty((sum(recv_splits), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), recv_splits, send_splits, group=group)
    return out


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, send_splits, recv_splits, group):
        ctx.splits, ctx.group = (send_splits, recv_splits), group
        return exchange(x, send_splits, recv_splits, group)

    @staticmethod
    def backward(ctx, grad):
        send_splits, recv_splits = ctx.splits
        return exchange(grad, recv_splits, send_splits, ctx.group), None, None, None


def all_to_all(x: torch.Tensor, send_splits: list[int], recv_splits: list[int], group=None) -> torch.Tensor:
    """``exchange`` that autograd can go through. It runs one collective in the backward pass too,
    so every rank of the group must call backward on a loss that depends on the output."""
    return _AllToAll.apply(x, send_splits, recv_splits, group)
