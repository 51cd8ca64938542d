"""Trained quantization by weight sharing (Han, Mao & Dally, Deep Compression, 2015).

Per layer, the non-zero weights are clustered into ``2**bits`` centroids by k-means (Lloyd's
algorithm in one dimension, centroids initialised evenly between the smallest and the largest
non-zero weight: the paper's "linear" initialisation, its best). Every weight is replaced by its
centroid; pruned weights (exact zeros) are not cluster members and stay exactly zero. Then the
centroids are fine-tuned on the task: each weight is tied to its centroid through a
parametrization (``weight = codebook[index]`` where not pruned), so the gradient of a centroid
is the sum of the gradients of its cluster's weights; afterwards the tied weights are baked
back into plain weights. A layer then holds at most ``2**bits`` distinct values (plus 0), which
storage/codebook.py stores as a codebook plus packed ``bits``-bit indices, and the .scz archive
(storage/archive.py) Huffman-codes.
"""
from __future__ import annotations

import fnmatch
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import nn
from torch.nn.utils import parametrize

from ..errors import UsageError
from ..registry import TORCH, TechniqueConfig, register
from ..stage import ModelState, StageContext, StageReport

LAYER_TYPES = {"Linear": nn.Linear, "Conv1d": nn.Conv1d, "Conv2d": nn.Conv2d, "Embedding": nn.Embedding}


class FineTune(BaseModel):
    """Fine-tuning of the centroids; ``epochs: 0`` (the default) leaves the k-means centroids."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    epochs: float = Field(default=0.0, ge=0)
    lr: float | None = Field(default=None, gt=0)          # the task's own when None
    max_steps: int | None = Field(default=None, ge=1)     # caps the steps of ``epochs``
    batch_size: int | None = Field(default=None, ge=1)    # the task's own when None


class WeightSharingConfig(TechniqueConfig):
    bits: int = Field(default=5, ge=2, le=8)               # 2**bits centroids per layer
    layer_bits: dict[str, int] = {}                        # layer pattern -> bits; the first match wins
    layers: list[str] = ["*"]                              # module-name patterns (fnmatch)
    exclude: list[str] = []
    layer_types: list[Literal["Linear", "Conv1d", "Conv2d", "Embedding"]] = ["Linear", "Conv2d"]
    iterations: int = Field(default=30, ge=0)              # Lloyd iterations (stops early when stable)
    train: FineTune = FineTune()
    # the final centroids of float32 layers rounded to float16 (a relative change under 2**-11, far
    # below the clustering error), so an archive stores each codebook entry in 2 bytes, exactly
    centroid_dtype: Literal["float32", "float16"] = "float16"

    @field_validator("layer_bits")
    @classmethod
    def _bits_range(cls, value: dict[str, int]) -> dict[str, int]:
        bad = {p: b for p, b in value.items() if not 2 <= b <= 8}
        if bad:
            raise ValueError(f"bits must be between 2 and 8; got {bad}")
        return value


class TiedWeight(nn.Module):
    """Parametrization ``weight = codebook[index]`` where ``mask``, else 0."""

    def __init__(self, codebook: torch.Tensor, index: torch.Tensor, mask: torch.Tensor):
        super().__init__()
        self.codebook = nn.Parameter(codebook)
        self.register_buffer("index", index)
        self.register_buffer("mask", mask)

    def forward(self, _original: torch.Tensor) -> torch.Tensor:
        return torch.where(self.mask, self.codebook[self.index], torch.zeros((), dtype=self.codebook.dtype))


def linear_init(values: np.ndarray, k: int) -> np.ndarray:
    return np.linspace(float(values.min()), float(values.max()), k)


def assign(values: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Index of the nearest of the ascending ``centroids`` for each value."""
    return np.searchsorted((centroids[1:] + centroids[:-1]) / 2, values)


def kmeans_1d(values: np.ndarray, k: int, iterations: int) -> tuple[np.ndarray, np.ndarray]:
    """Lloyd's k-means in one dimension from the linear initialisation: (centroids, index).
    An empty cluster keeps its centroid (the centroids stay ascending). With at most ``k``
    distinct values, those values are the centroids (no error)."""
    values = values.astype(np.float64)
    distinct, inverse = np.unique(values, return_inverse=True)
    if len(distinct) <= k:
        return distinct, inverse.reshape(-1)
    c = linear_init(values, k)
    idx = assign(values, c)
    for _ in range(iterations):
        counts = np.bincount(idx, minlength=k)
        sums = np.bincount(idx, weights=values, minlength=k)
        c = np.where(counts > 0, sums / np.maximum(counts, 1), c)
        new = assign(values, c)
        if np.array_equal(new, idx):
            break
        idx = new
    return c, idx


def _describe(mod: nn.Module) -> str:
    if isinstance(mod, nn.Linear):
        return f"Linear {mod.in_features}->{mod.out_features}"
    if isinstance(mod, nn.Embedding):
        return f"Embedding {mod.num_embeddings}x{mod.embedding_dim}"
    ks = "x".join(str(k) for k in mod.kernel_size)
    return f"Conv {ks} {mod.in_channels}->{mod.out_channels}"


def _select(model: nn.Module, cfg: WeightSharingConfig, report: StageReport) -> dict[str, tuple[nn.Module, int]]:
    names = [n for n, _ in model.named_modules() if n]
    for key, pats in (("layers", cfg.layers), ("exclude", cfg.exclude), ("layer_bits", list(cfg.layer_bits))):
        for pat in pats:
            if not any(fnmatch.fnmatchcase(n, pat) for n in names):
                raise UsageError(f"weight_sharing.{key}: pattern {pat!r} matches no layer of the model.",
                                 f"Layer names look like: {', '.join(names[:8])}{' ...' if len(names) > 8 else ''} "
                                 "(patterns are fnmatch-style: *, ?, [seq]).")
    types = tuple(LAYER_TYPES[t] for t in cfg.layer_types)
    chosen: dict[str, tuple[nn.Module, int]] = {}
    seen: dict[int, str] = {}
    for name, mod in model.named_modules():
        if not name or not isinstance(getattr(mod, "weight", None), torch.Tensor):
            continue
        if id(mod.weight) in seen:
            report.skipped[name] = f"its weight is the weight of {seen[id(mod.weight)]} (tied)"
            continue
        seen[id(mod.weight)] = name
        if not isinstance(mod, types):
            if isinstance(mod, tuple(LAYER_TYPES.values())):
                report.skipped[name] = f"{type(mod).__name__} not in layer_types"
            continue
        if not any(fnmatch.fnmatchcase(name, p) for p in cfg.layers):
            report.skipped[name] = "not matched by layers"
        elif any(fnmatch.fnmatchcase(name, p) for p in cfg.exclude):
            report.skipped[name] = "excluded by pattern"
        elif not mod.weight.is_floating_point():
            report.skipped[name] = f"weight is {mod.weight.dtype}, not float"
        elif not bool((mod.weight != 0).any()):
            report.skipped[name] = "every weight is zero"
        else:
            bits = next((b for p, b in cfg.layer_bits.items() if fnmatch.fnmatchcase(name, p)), cfg.bits)
            chosen[name] = (mod, bits)
    if not chosen:
        raise UsageError("weight_sharing: no layer selected; check layer_types, layers and exclude.")
    return chosen


def _sqnr_db(w: np.ndarray, q: np.ndarray) -> float:
    noise = float(np.sum((w - q) ** 2))
    return float("inf") if noise == 0 else 10 * np.log10(float(np.sum(w ** 2)) / noise)


@register("weight_sharing", WeightSharingConfig, accepts=(TORCH,),
          summary="k-means weight sharing per layer (2**bits centroids), centroids fine-tuned")
def weight_sharing(state: ModelState, cfg: WeightSharingConfig, ctx: StageContext) -> StageReport:
    report = StageReport("weight_sharing", cfg.model_dump())
    model = state.torch_model
    fine_tune = cfg.train.epochs > 0
    if fine_tune and ctx.task is None:
        raise UsageError("weight_sharing.train: fine-tuning the centroids needs a task (data to train on).",
                         "Set train.epochs to 0, or run the stage within `slimcart compress`.")
    chosen = _select(model, cfg, report)
    tied: dict[str, TiedWeight] = {}
    per: dict[str, dict[str, Any]] = {}
    for name, (mod, bits) in chosen.items():
        w = mod.weight.detach()
        mask = w != 0
        values = w[mask].double().cpu().numpy()
        centroids, idx = kmeans_1d(values, 1 << bits, cfg.iterations)
        book = torch.tensor(centroids, dtype=w.dtype)
        index = torch.zeros(w.shape, dtype=torch.long)
        index[mask] = torch.from_numpy(idx)
        tied[name] = TiedWeight(book, index, mask)
        q = book[torch.from_numpy(idx)].double().numpy()
        rel = float(np.linalg.norm(values - q) / max(np.linalg.norm(values), 1e-30))
        per[name] = {"bits": bits, "centroids": len(centroids), "nonzero": int(mask.sum()),
                     "sparsity": 1 - int(mask.sum()) / w.numel(), "sqnr_db": _sqnr_db(values, q),
                     "rel_error": rel}
    initial = {name: t.codebook.detach().clone() for name, t in tied.items()}
    for name, t in tied.items():
        parametrize.register_parametrization(chosen[name][0], "weight", t)
    try:
        if fine_tune:
            metric = ctx.task.primary_metric
            report.stats["val_after_clustering"] = ctx.task.evaluate(model, "val")[metric]
            record = _fine_tune(ctx, model, chosen, cfg.train)
            report.stats.update(val_after=record["val"][metric], metric=metric, train_steps=record["steps"])
    finally:
        for name, (mod, _) in chosen.items():
            parametrize.remove_parametrizations(mod, "weight", leave_parametrized=True)
    if cfg.centroid_dtype == "float16":
        with torch.no_grad():
            for mod, _ in chosen.values():
                if mod.weight.dtype == torch.float32 and float(mod.weight.abs().max()) < 65504:
                    mod.weight.copy_(mod.weight.half().float())
    for name, t in tied.items():
        shift = (t.codebook.detach() - initial[name]).abs().max()
        per[name]["centroid_shift"] = float(shift / initial[name].abs().max().clamp_min(1e-30))
    for name, (mod, _) in chosen.items():
        w = mod.weight.detach()
        per[name]["unique_values"] = int(torch.unique(w[w != 0]).numel())
        s = per[name]
        report.changed[name] = (f"{_describe(mod)}: {s['centroids']} centroids ({s['bits']} bits), "
                                f"{100 * s['rel_error']:.1f}% rel. error, SQNR {s['sqnr_db']:.1f} dB")
    report.stats.update(layers=len(chosen), weights_shared=sum(s["nonzero"] for s in per.values()),
                        bits={n: s["bits"] for n, s in per.items()},
                        unique_values={n: s["unique_values"] for n, s in per.items()},
                        sqnr_db={n: round(s["sqnr_db"], 2) for n, s in per.items()}, per_layer=per)
    report.notes.append("Each shared layer holds at most 2**bits distinct weights (plus its pruned zeros); the "
                        "saved model stores them as a codebook plus packed indices, and `slimcart archive` "
                        "Huffman-codes them into a .scz file for storage and transfer. Inference runs dense "
                        "float weights: sharing saves bytes, not time.")
    return report


def _fine_tune(ctx: StageContext, model: nn.Module, chosen: dict[str, tuple[nn.Module, int]],
               train: FineTune) -> dict[str, Any]:
    """Train the codebooks (and every other free parameter) on the task. The tied layers' own
    weights are frozen; other layers with exact zeros (pruned earlier) keep them."""
    from ..prune.gradual import apply_masks

    frozen = []
    for mod, _ in chosen.values():
        original = mod.parametrizations.weight.original
        if original.requires_grad:
            original.requires_grad_(False)
            frozen.append(original)
    shared = {id(mod) for mod, _ in chosen.values()}
    others = {n: m for n, m in model.named_modules()
              if isinstance(m, tuple(LAYER_TYPES.values())) and id(m) not in shared
              and m.weight.is_floating_point() and bool((m.weight == 0).any())}
    masks = {n: m.weight.detach() != 0 for n, m in others.items()}
    base = ctx.task.train_config("full")
    update: dict[str, Any] = {"epochs": train.epochs}
    for key in ("lr", "max_steps", "batch_size"):
        if getattr(train, key) is not None:
            update[key] = getattr(train, key)
    try:
        return ctx.task.train_model(model, base.model_copy(update=update), progress=ctx.progress,
                                    desc="fine-tune centroids", **ctx.train_checkpoint("finetune"),
                                    after_step=(lambda _m: apply_masks(others, masks)) if others else None)
    finally:
        for p in frozen:
            p.requires_grad_(True)
