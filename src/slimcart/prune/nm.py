"""N:M semi-structured sparsity (2:4 by default) for Linear layers: along the input dimension,
every group of M consecutive weights of a row keeps its N largest magnitudes.

The model stays a dense float module (what is saved and measured on CPU). Where CUDA is
available, a float16 copy is converted with ``torch.sparse.to_sparse_semi_structured`` to check
that the sparse kernels accept each layer and agree with the dense product;
``convert_semi_structured`` does the same conversion in place for GPU deployment.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ..errors import UsageError
from ..registry import TORCH, TechniqueConfig, register
from ..stage import ModelState, StageContext, StageReport
from .gradual import apply_masks, finetune_masked, sparsity_counts
from .magnitude import MagnitudePruneConfig, select_layers

CPU_KERNEL = "dense (CPU: no semi-structured kernels)"


class NMPruneConfig(TechniqueConfig):
    n: int = Field(default=2, ge=1)
    m: int = Field(default=4, ge=2)
    finetune_epochs: float = Field(default=0.0, ge=0)
    lr: float | None = Field(default=None, gt=0)
    use_cuda_kernels: bool = True
    include: list[str] = ["*"]
    exclude: list[str] = []

    def model_post_init(self, _ctx) -> None:
        if self.n >= self.m:
            raise ValueError(f"N must be smaller than M (got {self.n}:{self.m})")


def nm_mask(weight: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep-mask keeping the ``n`` largest magnitudes of each group of ``m`` along dim 1."""
    rows, cols = weight.shape
    groups = weight.detach().abs().reshape(rows, cols // m, m)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(-1, groups.topk(n, dim=-1).indices, True)
    return keep.reshape(rows, cols)


def max_nonzeros_per_group(weight: torch.Tensor, m: int) -> int:
    rows, cols = weight.shape
    return int((weight.detach() != 0).reshape(rows, cols // m, m).sum(-1).max())


def convert_semi_structured(model: nn.Module, names: list[str]) -> dict[str, str]:
    """In place, on a model already on CUDA in float16/bfloat16: swap each named Linear weight
    for its semi-structured form. Returns per layer 'semi-structured' or why it stayed dense."""
    from torch.sparse import to_sparse_semi_structured

    mods, status = dict(model.named_modules()), {}
    for name in names:
        lin = mods[name]
        try:
            lin.weight = nn.Parameter(to_sparse_semi_structured(lin.weight.detach()), requires_grad=False)
            status[name] = "semi-structured"
        except (RuntimeError, ValueError, NotImplementedError) as exc:
            status[name] = f"dense ({str(exc).strip().splitlines()[0][:160]})"
    return status


def _cuda_check(model: nn.Module, names: list[str]) -> dict[str, str]:
    """Convert a float16 CUDA copy and compare each converted layer with its dense product."""
    dev = copy.deepcopy(model).to("cuda", torch.float16).eval()
    mods = dict(dev.named_modules())
    dense = {n: mods[n].weight.detach().clone() for n in names}
    status = convert_semi_structured(dev, names)
    gen = torch.Generator(device="cuda").manual_seed(0)
    for name, s in status.items():
        if s != "semi-structured":
            continue
        lin = mods[name]
        x = torch.randn(64, lin.in_features, device="cuda", dtype=torch.float16, generator=gen)
        with torch.inference_mode():
            diff = float((lin(x) - F.linear(x, dense[name], lin.bias)).abs().max())
        status[name] = f"semi-structured fp16, max |diff| vs dense {diff:.2e}"
    del dev
    torch.cuda.empty_cache()
    return status


@register("nm_prune", NMPruneConfig, accepts=(TORCH,),
          summary="N:M semi-structured sparsity (2:4) for Linear layers along the input dim")
def nm_prune(state: ModelState, cfg: NMPruneConfig, ctx: StageContext) -> StageReport:
    report = StageReport("nm_prune", cfg.model_dump())
    model = state.torch_model
    chosen = select_layers(model, MagnitudePruneConfig(sparsity=0.0, layer_types=["Linear"],
                                                       include=cfg.include, exclude=cfg.exclude), report)
    layers = {}
    for name, lin in chosen.items():
        if lin.in_features % cfg.m:
            report.skipped[name] = f"in_features {lin.in_features} not divisible by M={cfg.m}"
        else:
            layers[name] = lin
    if not layers:
        raise UsageError(f"nm_prune: no selected Linear layer has in_features divisible by {cfg.m}.",
                         f"Skipped: {report.skipped}")
    masks = {name: nm_mask(lin.weight, cfg.n, cfg.m) for name, lin in layers.items()}
    apply_masks(layers, masks)
    stats = {"pattern": f"{cfg.n}:{cfg.m}"}
    if cfg.finetune_epochs > 0:
        record = finetune_masked(ctx, model, layers, masks, cfg.finetune_epochs, cfg.lr, 0, "fine-tune N:M")
        stats["val_after_finetune"] = record["val"]
    for name, lin in layers.items():
        if max_nonzeros_per_group(lin.weight, cfg.m) > cfg.n:
            raise RuntimeError(f"nm_prune: {name} breaks the {cfg.n}:{cfg.m} pattern after pruning")
    per, zeros, total = sparsity_counts(layers)
    for name, s in per.items():
        report.changed[name] = f"{cfg.n}:{cfg.m}, sparsity {s:.4f}"
    stats.update(sparsity=zeros / total, pruned_weights=zeros, weights_in_scope=total,
                 layers=len(layers), verified=True)
    if cfg.use_cuda_kernels and torch.cuda.is_available():
        status = _cuda_check(model, list(layers))
        used = any(s.startswith("semi-structured") for s in status.values())
        stats.update(semi_structured=used, cuda_layers=status,
                     kernel="semi-structured fp16 (CUDA, checked on a float16 copy)" if used
                     else "dense (CUDA kernels rejected every layer)")
    else:
        stats.update(semi_structured=False, kernel=CPU_KERNEL if not torch.cuda.is_available()
                     else "dense (use_cuda_kernels is false)")
    report.stats = stats
    return report
