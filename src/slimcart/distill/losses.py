"""Distillation losses as plain functions of tensors (each checked against hand-computed values).

- ``soft_kl``: Hinton et al. (2015), ``T^2 * KL(softmax(t/T) || softmax(s/T))``, averaged over rows;
  the ``T^2`` keeps its gradient on the scale of the hard-label loss as ``T`` grows.
- ``soft_bce``: pointwise distillation of a binary (CTR) model: BCE of the student's logit
  against the teacher's probability ``sigmoid(t/T)``.
- ``pairwise_rank``: ranking distillation: for every pair (i, j) of rows in the same group the
  student's ``sigmoid((s_i - s_j)/T)`` is fitted by BCE to the teacher's ``sigmoid((t_i - t_j)/T)``,
  so the student learns the teacher's order (and its confidence in it), not only its scores.
- ``hidden_mse``: mean squared error between hidden states over the valid positions (mask).
- ``relation_kl``: MiniLM (Wang et al., 2020) self-attention relations: per head,
  ``softmax(A A^T / sqrt(d))`` over the key positions, for A the queries, keys or values; the KL
  from the teacher's relation to the student's, averaged over heads and valid query positions.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def soft_kl(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    t = temperature
    log_p_s = F.log_softmax(student.float() / t, dim=-1)
    log_p_t = F.log_softmax(teacher.float() / t, dim=-1)
    return (t * t) * (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1).mean()


def soft_bce(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    target = torch.sigmoid(teacher.float() / temperature)
    return F.binary_cross_entropy_with_logits(student.float() / temperature, target) * temperature ** 2


def pairwise_rank(student: Tensor, teacher: Tensor, groups: Tensor | None, temperature: float) -> Tensor:
    """Rows are paired within their group (``groups``: one id per row), or all with all when
    ``groups`` is None. Pairs of equal teacher scores carry the target 0.5. Zero when no pair."""
    s, t = student.float().reshape(-1), teacher.float().reshape(-1)
    ds = (s[:, None] - s[None, :]) / temperature
    dt = (t[:, None] - t[None, :]) / temperature
    pair = torch.ones_like(ds, dtype=torch.bool).triu(1)
    if groups is not None:
        g = groups.reshape(-1)
        pair &= g[:, None] == g[None, :]
    if not pair.any():
        return s.sum() * 0.0
    return F.binary_cross_entropy_with_logits(ds[pair], torch.sigmoid(dt[pair])) * temperature ** 2


def adapter_key(name: str) -> str:
    """The key of a layer's adapter in a ModuleDict (which refuses dots in names)."""
    return name.replace(".", "__")


def hidden_mse(student: Tensor, teacher: Tensor, mask: Tensor | None = None) -> Tensor:
    """``student`` and ``teacher`` [B, L, D] (or any [B, ...]); ``mask`` [B, L] of valid positions."""
    diff = (student.float() - teacher.float()).pow(2)
    if mask is None:
        return diff.mean()
    m = mask.to(diff.dtype).unsqueeze(-1)
    return (diff * m).sum() / (m.sum() * diff.shape[-1]).clamp(min=1.0)


def relation(a: Tensor, b: Tensor, heads: int, mask: Tensor | None) -> Tensor:
    """Log of the per-head relation ``softmax(A B^T / sqrt(d))`` of ``a``, ``b`` [B, L, H*d]:
    [B, H, L, L]; the keys outside ``mask`` [B, L] get probability 0."""
    bsz, length, width = a.shape
    d = width // heads
    x = a.float().reshape(bsz, length, heads, d).transpose(1, 2)
    y = b.float().reshape(bsz, length, heads, d).transpose(1, 2)
    scores = x @ y.transpose(-1, -2) / math.sqrt(d)
    if mask is not None:
        scores = scores.masked_fill(~mask.bool()[:, None, None, :], -1e9)  # probability 0, log finite
    return F.log_softmax(scores, dim=-1)


def relation_heads(heads: int, *widths: int) -> int:
    """The most relation heads, at most ``heads``, that divide every width (0 widths are ignored)."""
    return max(r for r in range(1, max(1, heads) + 1) if all(w % r == 0 for w in widths if w))


def relation_kl(student: tuple[Tensor, Tensor], teacher: tuple[Tensor, Tensor], heads: int,
                mask: Tensor | None = None) -> Tensor:
    """KL(teacher relation || student relation), for the pairs (A, B) of each side: (queries, keys)
    gives MiniLM's attention distributions, (values, values) its value relation. Both sides are
    split into ``heads`` relation heads, which must divide both widths."""
    for side in (*student, *teacher):
        if side.shape[-1] % heads:
            raise ValueError(f"relation heads {heads} do not divide the width {side.shape[-1]}")
    log_s, log_t = relation(*student, heads, mask), relation(*teacher, heads, mask)
    kl = (log_t.exp() * (log_t - log_s)).sum(-1)  # [B, H, L]; masked keys have probability 0
    if mask is None:
        return kl.mean()
    m = mask.to(kl.dtype)[:, None, :]
    return (kl * m).sum() / (m.sum() * heads).clamp(min=1.0)
