"""Fold each BatchNorm into the Conv/Linear just before it (PyTorch's fuse_conv_bn_eval /
fuse_linear_bn_eval): one layer less per pair at inference, the same outputs to float precision.

Pairs are found by running the model once with hooks (the BatchNorm's input must be the very
tensor the layer returned, each called once) and confirmed with torch.fx where the model traces
(the layer's output must feed nothing but the BatchNorm). Subclasses of the layers are left alone
unless their forward is known to be linear in their weight (timm's ``Conv2dSame``). The folding goes into
``spec["bn_folded"]`` (see models/fold.py), so the saved model rebuilds; the folded model is
checked against the unfolded one on real inputs.
"""
from __future__ import annotations

import copy
import operator

import torch
from pydantic import Field
from torch import fx, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

from ..errors import ModelError
from ..models.fold import VERSION, add_bias, apply_folding, has_act, out_features, remainder, set_module
from ..registry import TORCH, TechniqueConfig, register
from ..stage import ModelState, StageContext, StageReport

LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Linear)
NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
FRESH = (nn.modules.conv._ConvNd, nn.Linear, nn.modules.batchnorm._BatchNorm)  # return a new tensor
# subclasses whose forward is the plain convolution of their own weight and bias after padding the
# input (timm's TF "same" padding): a BatchNorm after them folds like after an nn.Conv2d
LINEAR_SUBCLASSES = {"timm.layers.conv2d_same.Conv2dSame"}


def _plain_layer(layer: nn.Module) -> bool:
    t = type(layer)
    return t in LAYERS or f"{t.__module__}.{t.__qualname__}" in LINEAR_SUBCLASSES


class FoldBnConfig(TechniqueConfig):
    max_abs_error: float = Field(default=1e-5, gt=0)  # folded vs unfolded outputs; exceeding both
    max_rel_error: float = Field(default=1e-5, gt=0)  # bounds fails the stage (rel: to max |output|)
    parity_batch: int = Field(default=64, ge=1)
    inplace_relu: bool = True                          # ReLUs whose input nothing else reads


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, name: str) -> bool:
        return isinstance(m, (nn.modules.batchnorm._BatchNorm, *LAYERS)) or super().is_leaf_module(m, name)


def _run_once(model: nn.Module, example) -> tuple[dict, dict[str, str | None], dict[str, int]]:
    """Run the model with hooks: call counts, each BatchNorm's source layer (the layer whose
    output object it received) and each layer's output rank."""
    names = {m: n for n, m in model.named_modules()}
    calls: dict[str, int] = {}
    made: dict[int, str] = {}
    keep: list[torch.Tensor] = []       # keeps outputs alive so that their ids stay unique
    source: dict[str, str | None] = {}
    rank: dict[str, int] = {}

    def after_layer(mod, _inp, out):
        n = names[mod]
        calls[n] = calls.get(n, 0) + 1
        if isinstance(out, torch.Tensor):
            made[id(out)], rank[n] = n, out.dim()
            keep.append(out)

    def before_norm(mod, inp):
        n = names[mod]
        calls[n] = calls.get(n, 0) + 1
        source[n] = made.get(id(inp[0])) if inp and isinstance(inp[0], torch.Tensor) else None

    hooks = [m.register_forward_hook(after_layer) for m in model.modules() if isinstance(m, LAYERS)]
    hooks += [m.register_forward_pre_hook(before_norm) for m in model.modules()
              if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    try:
        with torch.inference_mode():
            model(*example)
    finally:
        for h in hooks:
            h.remove()
    return calls, source, rank


def _trace(model: nn.Module) -> fx.Graph | None:
    try:
        return _Tracer().trace(model)
    except Exception:  # models with data-dependent control flow do not trace; hooks alone then
        return None


def find_pairs(model: nn.Module, example) -> tuple[list[tuple[str, str]], dict[str, str], str]:
    """(layer, batchnorm) pairs that can be folded, the BatchNorms left alone with the reason,
    and how the pairs were checked."""
    mods = dict(model.named_modules())
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in mods.values()):
        return [], {}, "no BatchNorm"
    calls, source, rank = _run_once(model, example)
    graph = _trace(model)
    users = {n.target: list(n.users) for n in graph.nodes if n.op == "call_module"} if graph else {}
    pairs, skipped = [], {}
    for name, bn in mods.items():
        if not isinstance(bn, nn.modules.batchnorm._BatchNorm):
            continue
        src = source.get(name)
        why = None
        if name not in calls:
            why = "not run in forward"
        elif type(bn) not in NORMS and not has_act(bn):
            why = f"a {type(bn).__name__} (a custom BatchNorm class; its forward may do more than normalise)"
        elif bn.running_mean is None or bn.running_var is None:
            why = "no running statistics (it normalises with batch statistics)"
        elif src is None:
            why = "its input is not the output of a Conv/Linear layer"
        elif not _plain_layer(mods[src]):
            why = f"follows {src}, a {type(mods[src]).__name__} (custom class; its forward may transform the weight)"
        elif calls[name] > 1 or calls[src] > 1:
            why = f"{name if calls[name] > 1 else src} runs more than once per forward"
        elif out_features(mods[src]) != bn.num_features:
            why = f"{src} has {out_features(mods[src])} outputs, the BatchNorm {bn.num_features} features"
        elif isinstance(mods[src], nn.Linear) and rank.get(src) != 2:
            why = f"{src} is a Linear on {rank.get(src)}-D inputs; the BatchNorm normalises another axis"
        elif graph is not None and [u.target for u in users.get(src, [])] != [name]:
            why = f"the output of {src} is also read by something else"
        if why:
            skipped[name] = why
        else:
            pairs.append((src, name))
    how = "hooks + torch.fx (single use checked)" if graph is not None else \
        "hooks only (the model does not trace with torch.fx; the parity check guards the folding)"
    return pairs, skipped, how


def _relus_to_inplace(model: nn.Module) -> list[str]:
    """ReLU modules (not yet inplace) whose every call reads a fresh tensor that nothing else reads."""
    graph = _trace(model)
    if graph is None:
        return []
    mods = dict(model.named_modules())
    sites: dict[str, list[bool]] = {}
    for node in graph.nodes:
        if node.op == "call_module" and isinstance(mods.get(node.target), nn.ReLU):
            sites.setdefault(node.target, []).append(_fresh_and_private(node.args[0], mods))
    return [n for n, ok in sites.items() if all(ok) and not mods[n].inplace]


def _fresh_and_private(node, mods) -> bool:
    """``node`` is a tensor only its one user reads, made by a layer or an add (through Identities)."""
    while isinstance(node, fx.Node) and len(node.users) == 1:
        if node.op == "call_module" and isinstance(mods[node.target], nn.Identity):
            node = node.args[0]
            continue
        if node.op == "call_module":
            return isinstance(mods[node.target], FRESH)
        return node.op == "call_function" and node.target in (operator.add, torch.add)
    return False


@register("fold_bn", FoldBnConfig, accepts=(TORCH,),
          summary="fold BatchNorm into the Conv/Linear before it (+ inplace ReLU), checked against eager")
def fold_bn(state: ModelState, cfg: FoldBnConfig, ctx: StageContext) -> StageReport:
    report = StageReport("fold_bn", cfg.model_dump())
    model = state.torch_model.eval()
    example = ctx.task.example_inputs(2, "val")
    pairs, report.skipped, how = find_pairs(model, example)
    if not pairs:
        report.stats.update(pairs_folded=0)
        report.notes.append("nothing to fold: " + (
            "the model has no BatchNorm layer" if not report.skipped else "no BatchNorm directly follows "
            "a Conv/Linear it can be folded into (see skipped)"))
        return report
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for layer_name, bn_name in pairs:
            layer, bn = model.get_submodule(layer_name), model.get_submodule(bn_name)
            if isinstance(layer, nn.Linear):
                fused = fuse_linear_bn_eval(layer, bn)
            else:
                fused = fuse_conv_bn_eval(layer, bn, transpose=isinstance(layer, nn.modules.conv._ConvTransposeNd))
            add_bias(fused)
            set_module(model, layer_name, fused)
            set_module(model, bn_name, remainder(bn))
            report.changed[bn_name] = f"folded into {layer_name}" + (" (its activation kept)" if has_act(bn) else "")
    relus = _relus_to_inplace(model) if cfg.inplace_relu else []
    apply_folding(model, {"version": VERSION, "pairs": [], "inplace_relu": relus})
    report.changed.update({n: "inplace=True (nothing else reads its input)" for n in relus})
    prior = state.spec.get("bn_folded") or {"version": VERSION, "pairs": [], "inplace_relu": []}
    state.spec = {**state.spec, "bn_folded": {
        "version": VERSION, "pairs": prior["pairs"] + [list(p) for p in pairs],
        "inplace_relu": sorted(set(prior.get("inplace_relu", [])) | set(relus))}}
    x = ctx.task.example_inputs(cfg.parity_batch, "val")
    with torch.inference_mode():
        ref, got = reference(*x).float(), model(*x).float()
    err = float((ref - got).abs().max())
    rel = err / max(float(ref.abs().max()), 1e-12)
    report.stats.update(pairs_folded=len(pairs), batchnorms_left=len(report.skipped), relu_inplace=len(relus),
                        pairing=how, max_abs_error=err, max_rel_error=rel, parity_rows=int(ref.shape[0]))
    if err > cfg.max_abs_error and rel > cfg.max_rel_error:
        raise ModelError(f"fold_bn: the folded model disagrees with the unfolded one: max abs error {err:.3g}, "
                         f"relative {rel:.3g} (bounds {cfg.max_abs_error}, {cfg.max_rel_error}).",
                         "Raise max_abs_error / max_rel_error in the stage if this is expected, or report "
                         "the model: a folded pair may not be what it seems.")
    return report
