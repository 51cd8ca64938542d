"""Optimizers for models with embedding tables.

* :class:`RowWiseAdagrad`: row-wise Adagrad for tables (and table shards), touching only the rows
  looked up in a step.
* :class:`TablesAndAdamW`: one optimizer for a whole CTR model: row-wise Adagrad on the groups
  marked ``rows=True`` (the embedding tables), AdamW on the others. Being one
  ``torch.optim.Optimizer`` it works with the Trainer's learning-rate schedule (which scales every
  group's lr), gradient clipping and checkpoints.

Why row-wise Adagrad and not Adam for tables: Adam keeps two moments of the table's full size and
its momentum keeps moving rows that were not looked up (with weight decay it shrinks every row at
every step, so rare ids lose what they learnt between their visits); SparseAdam avoids that but
still keeps two full-size moments. Row-wise Adagrad has no momentum and no weight decay, so rows
never looked up stay bit-for-bit unchanged, and its state is one float per row (1/dim of the table).
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import Tensor, nn

from .errors import UsageError


def _closure_loss(closure: Callable[[], Any] | None):
    """What ``Optimizer.step(closure)`` returns: the closure's loss, computed with gradients on."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


def _rows_and_grads(grad: Tensor) -> tuple[Tensor, Tensor]:
    """The looked-up rows of a (sparse or dense) table gradient and their gradients."""
    if grad.is_sparse:
        grad = grad.coalesce()
        rows, g = grad.indices()[0], grad.values()
        keep = g.ne(0).any(1)
        return rows[keep], g[keep]
    rows = grad.ne(0).any(1).nonzero().squeeze(1)
    return rows, grad.index_select(0, rows)


@torch.no_grad()
def rowwise_adagrad_step(p: Tensor, grad: Tensor, acc: Tensor, lr: float, eps: float) -> int:
    """One row-wise Adagrad update of table ``p`` with accumulator ``acc``; returns the rows updated.

    For a looked-up row i with gradient g_i (length dim):
        acc_i += mean(g_i ** 2);   w_i -= lr * g_i / (sqrt(acc_i) + eps)
    """
    rows, g = _rows_and_grads(grad)
    if rows.numel() == 0:
        return 0
    new = acc.index_select(0, rows) + g.float().pow(2).mean(1)
    acc.index_copy_(0, rows, new)
    update = g.float() / (new.sqrt() + eps).unsqueeze(1)
    p.index_add_(0, rows, update.to(p.dtype), alpha=-lr)
    return int(rows.numel())


class RowWiseAdagrad(torch.optim.Optimizer):
    """Row-wise Adagrad for embedding tables or shards: one accumulator per row (the running sum of
    the mean squared gradient of the row), and a step that reads and writes only the rows looked up
    in this step (on any rank). With sparse gradients (``F.embedding(..., sparse=True)``) a step
    costs the rows read, not the table's size; a dense gradient is accepted too (its non-zero rows
    are updated)."""

    def __init__(self, params, lr: float = 0.05, eps: float = 1e-8, initial_accumulator_value: float = 0.0):
        if lr <= 0 or eps < 0 or initial_accumulator_value < 0:
            raise UsageError(f"RowWiseAdagrad needs lr > 0, eps >= 0 and initial_accumulator_value >= 0; "
                             f"got lr={lr}, eps={eps}, initial_accumulator_value={initial_accumulator_value}.")
        super().__init__(params, {"lr": lr, "eps": eps, "initial_accumulator_value": initial_accumulator_value})
        for group in self.param_groups:
            for p in group["params"]:
                if p.dim() != 2:
                    raise UsageError(f"RowWiseAdagrad works on 2-D tables; got a parameter of shape "
                                     f"{tuple(p.shape)}.", "Give it the table shards only.")
                self.state[p]["sum"] = torch.full((p.shape[0],), float(initial_accumulator_value),
                                                  dtype=torch.float32, device=p.device)
        self.rows_updated = 0  # rows touched by the last step, over all parameters

    def state_bytes(self) -> int:
        return sum(s["sum"].numel() * s["sum"].element_size() for s in self.state.values())

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None):
        loss = _closure_loss(closure)
        self.rows_updated = 0
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self.rows_updated += rowwise_adagrad_step(p, p.grad, self.state[p]["sum"],
                                                              group["lr"], group["eps"])
        return loss


def table_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The plain, trainable weights of the model's ``nn.Embedding`` modules (a parametrized weight,
    e.g. a shared-weight codebook, is not a table here)."""
    out, seen = [], set()
    for m in model.modules():
        w = m._parameters.get("weight") if isinstance(m, nn.Embedding) else None
        if isinstance(w, nn.Parameter) and w.requires_grad and w.dim() == 2 and id(w) not in seen:
            seen.add(id(w))
            out.append(w)
    return out


class TablesAndAdamW(torch.optim.Optimizer):
    """Row-wise Adagrad on the param groups with ``rows=True``, AdamW (decoupled weight decay, as
    ``torch.optim.AdamW``) on the others. Group keys: lr, and for AdamW groups betas, eps,
    weight_decay; for row groups eps."""

    def __init__(self, groups: list[dict[str, Any]], betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0):
        for g in groups:
            if g.get("rows"):
                for p in g["params"]:
                    if p.dim() != 2:
                        raise UsageError(f"Row-wise groups hold 2-D tables; got a parameter of shape "
                                         f"{tuple(p.shape)}.")
        super().__init__(groups, {"betas": tuple(betas), "eps": eps, "weight_decay": weight_decay,
                                  "rows": False})

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None):
        loss = _closure_loss(closure)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if group["rows"]:
                    if "sum" not in state:
                        state["sum"] = torch.zeros(p.shape[0], dtype=torch.float32, device=p.device)
                    rowwise_adagrad_step(p, p.grad, state["sum"], group["lr"], group["eps"])
                    continue
                self._adamw(p, p.grad.to_dense() if p.grad.is_sparse else p.grad, state, group)
        return loss

    @staticmethod
    def _adamw(p: Tensor, g: Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        if "exp_avg" not in state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["step"] = int(state["step"]) + 1
        (b1, b2), lr, step = group["betas"], group["lr"], state["step"]
        if group["weight_decay"]:
            p.mul_(1 - lr * group["weight_decay"])
        state["exp_avg"].lerp_(g, 1 - b1)
        state["exp_avg_sq"].mul_(b2).addcmul_(g, g, value=1 - b2)
        denom = (state["exp_avg_sq"].sqrt() / math.sqrt(1 - b2 ** step)).add_(group["eps"])
        p.addcdiv_(state["exp_avg"], denom, value=-lr / (1 - b1 ** step))
