"""Augmented copies for image distillation: each training batch is also seen as random crops
(a share ``min_scale``..1 of each side, aspect ratio kept within 3:4..4:3) resized back to the input
size and flipped left-right half of the time, and the student matches the teacher's soft targets on
that copy. Teacher and student see the same crop, so the teacher's answer is exact for what the
student sees ("consistent" function matching, Beyer et al. 2022); with few labelled photos, these
targets say more than the labels on the stored images. With ``mixup``, each copy is also blended
with another photo of the batch (weight drawn from Beta(mixup, mixup)), so the student learns the
teacher's answers between the photos too. The teacher runs on each copy (no cache)."""
from __future__ import annotations

import copy
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..trainer import Batch, LossTerm
from . import losses


def crop_flip(x: Tensor, gen: torch.Generator, min_scale: float) -> Tensor:
    """Per image: a random crop of ``min_scale``..1 of each side, resized to the input size
    (bilinear), mirrored with probability 1/2; one batched grid_sample."""
    n = x.shape[0]
    area = min_scale ** 2 + (1 - min_scale ** 2) * torch.rand(n, generator=gen)
    log_ratio = (torch.rand(n, generator=gen) * 2 - 1) * math.log(4 / 3)
    sx = (area * log_ratio.exp()).sqrt().clamp(max=1.0)
    sy = (area / log_ratio.exp()).sqrt().clamp(max=1.0)
    tx = (torch.rand(n, generator=gen) * 2 - 1) * (1 - sx)
    ty = (torch.rand(n, generator=gen) * 2 - 1) * (1 - sy)
    flip = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = sx * flip, tx, sy, ty
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def mix(x: Tensor, rng: np.random.Generator, a: float) -> Tensor:
    """Per image: ``lam * x + (1 - lam) * x[perm]``, lam ~ Beta(a, a), perm a random permutation."""
    n = x.shape[0]
    lam = torch.from_numpy(rng.beta(a, a, n)).to(x.dtype).view(n, *([1] * (x.dim() - 1)))
    perm = torch.from_numpy(rng.permutation(n))
    return lam * x + (1 - lam) * x[perm]


class CropFlipCopy(LossTerm):
    """Soft-target KL on a crop-and-flip copy of the batch, the teacher scoring the same copy. It
    calls the student again, so it must be the last term (captured layers are overwritten)."""

    def __init__(self, teacher: nn.Module, min_scale: float, temperature: float, weight: float, seed: int,
                 mixup: float = 0.0, pairs: dict[str, str] | None = None, adapters: nn.ModuleDict | None = None,
                 hidden_weight: float = 0.0):
        # a channels-last copy: the teacher runs at every step, and its NHWC convolutions are faster
        # (``trainer.use_channels_last``); the caller's teacher keeps its layout
        teacher = copy.deepcopy(teacher).eval().to(memory_format=torch.channels_last)
        self.teacher, self.min_scale, self.t, self.weight, self.name = teacher, min_scale, temperature, weight, "crop_copy"
        self.gen, self.mixup = torch.Generator().manual_seed(seed), mixup
        self.rng = np.random.default_rng(seed)
        # hidden_loss on the copy too: the teacher's layers of ``pairs`` are read by hooks, the
        # student's from the trainer's capture (``batch.hidden``, refilled by the second call)
        self.pairs, self.adapters, self.hidden_weight = dict(pairs or {}), adapters, hidden_weight
        self.grabbed: dict[str, Tensor] = {}
        modules = dict(teacher.named_modules())
        for t in set(self.pairs.values()) if hidden_weight > 0 else ():
            modules[t].register_forward_hook(lambda _m, _a, o, t=t: self.grabbed.__setitem__(t, o))

    def __call__(self, batch: Batch, model: nn.Module) -> Tensor:
        x = crop_flip(batch.inputs[0], self.gen, self.min_scale)
        if self.mixup > 0:
            x = mix(x, self.rng, self.mixup)
        with torch.inference_mode():
            target = self.teacher(x).float()
        wanted = {t: self.grabbed[t].clone() for t in set(self.pairs.values())} if self.hidden_weight > 0 else {}
        loss = losses.soft_kl(model(x), target.clone(), self.t)
        if wanted:
            feats = 0.0
            for s, t in self.pairs.items():
                out = batch.hidden[s]
                key = losses.adapter_key(s)
                if self.adapters is not None and key in self.adapters:
                    out = self.adapters[key](out)
                feats = feats + losses.hidden_mse(out, wanted[t])
            # in the copy's units: its weight (1 - alpha) is applied by the trainer, so rescale
            loss = loss + (self.hidden_weight / self.weight) * feats / len(self.pairs)
        return loss
