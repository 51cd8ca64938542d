"""Structured pruning with Torch-Pruning's dependency graph: coupled layers (residual adds, BN,
q/k/v/output) lose the same channels together, so the model really gets smaller; the new sizes go
into ``spec["reshape"]``. ``channel_prune``: conv channels and hidden neurons (CNN, DeepFM, MLPs);
``head_prune``: attention heads and FFN width of BERT-family encoders, hidden size kept."""
from __future__ import annotations

import fnmatch
import math
import warnings
from contextlib import contextmanager

import torch
import torch_pruning as tp
from pydantic import Field
from torch import nn

from ..errors import ModelError, SlimcartError, UsageError
from ..models.reshape import _attrs, free_params, layer_shapes, record_reshape
from ..registry import TORCH, TechniqueConfig, register
from ..stage import ModelState, StageContext, StageReport

OUTPUT_KEPT = "output layer (produces the model's outputs); kept"
HINT = ("Torch-Pruning traces the forward pass with autograd, so it must stay differentiable; exclude "
        "a layer whose pruning fails (exclude: [...]), or use magnitude_prune, which traces nothing.")


class StructuredConfig(TechniqueConfig):
    importance: str = "magnitude"               # magnitude | taylor (loss gradients on train batches)
    taylor_batches: int = Field(default=4, ge=1)
    batch_size: int = Field(default=64, ge=1)   # of the Taylor gradient batches
    global_pruning: bool = False                # rank across layers instead of per layer
    round_to: int | None = Field(default=None, ge=1)  # kept widths rounded down to a multiple
    exclude: list[str] = []                     # module-name patterns (fnmatch) left intact
    finetune_epochs: float = Field(default=0.0, ge=0.0)

    def model_post_init(self, _ctx) -> None:
        if self.importance not in ("magnitude", "taylor"):
            raise ValueError("importance must be 'magnitude' or 'taylor'")


class ChannelPruneConfig(StructuredConfig):
    ratio: float = Field(ge=0.0, lt=1.0)        # fraction of prunable channels to remove
    iterative_steps: int = Field(default=1, ge=1)


class HeadPruneConfig(StructuredConfig):
    heads_ratio: float = Field(default=0.0, ge=0.0, lt=1.0)  # fraction of attention heads to remove
    ffn_ratio: float = Field(default=0.0, ge=0.0, lt=1.0)    # fraction of FFN intermediate neurons

    def model_post_init(self, ctx) -> None:
        super().model_post_init(ctx)
        if self.heads_ratio == 0 and self.ffn_ratio == 0:
            raise ValueError("set heads_ratio and/or ffn_ratio above 0")


@contextmanager
def blame(model: nn.Module, what: str):
    """Turn an exception inside torch / Torch-Pruning into a ModelError naming the layer that ran."""
    stack: list[str] = []
    names = {m: n or "<model>" for n, m in model.named_modules()}
    hooks = [h for m in model.modules() for h in (
        m.register_forward_pre_hook(lambda mod, _a: stack.append(names[mod])),
        m.register_forward_hook(lambda _m, _a, _o: stack.pop() and None))]
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Unwrapped parameters")  # pruned ones are reported
            yield
    except SlimcartError:
        raise
    except Exception as exc:  # Torch-Pruning and autograd raise many types
        where = f" in layer {stack[-1]!r}" if stack else ""
        raise ModelError(f"{what} failed{where}: {type(exc).__name__}: {str(exc)[:300]}", HINT) from None
    finally:
        for h in hooks:
            h.remove()


def count(model: nn.Module, example) -> tuple[int, int]:
    with torch.no_grad():
        macs, params = tp.utils.count_ops_and_params(model, example)
    return int(macs), int(params)


def excluded_by(names: list[str], patterns: list[str], technique: str) -> dict[str, str]:
    """Module name -> the pattern excluding it or an ancestor; a pattern matching nothing is an error."""
    for pat in patterns:
        if not any(fnmatch.fnmatchcase(n, pat) for n in names):
            raise UsageError(f"{technique}: exclude pattern {pat!r} matches no layer.",
                             f"Layer names look like: {', '.join(names[1:7])} ...")
    return {n: pat for n in names for pat in reversed(patterns) if any(
        fnmatch.fnmatchcase(".".join(n.split(".")[:i]), pat) for i in range(1, n.count(".") + 2))}


def taylor_grads(model: nn.Module, cfg: StructuredConfig, task) -> None:
    model.zero_grad(set_to_none=True)
    for x, y in task.batches("train", cfg.batch_size, shuffle=True, limit=cfg.taylor_batches * cfg.batch_size):
        task.loss(model(*x), y).backward()


def importance(cfg: StructuredConfig):
    taylor = cfg.importance == "taylor"
    return tp.importance.GroupTaylorImportance() if taylor else tp.importance.GroupMagnitudeImportance(p=2)


def finetune(model: nn.Module, ctx: StageContext, epochs: float, desc: str, name: str = "finetune") -> dict:
    tcfg = ctx.task.train_config("full").model_copy(update={"epochs": epochs})
    return ctx.task.train_model(model, tcfg, progress=ctx.progress, desc=desc, **ctx.train_checkpoint(name))


def setup(state: ModelState, cfg: StructuredConfig, ctx: StageContext, report: StageReport):
    """Model (eval mode), example inputs, output shape, output layer (the Conv/Linear that runs
    last: it produces the logits) and (MACs, params) before pruning."""
    if ctx.task is None:
        raise UsageError(f"{report.technique} needs a task (example inputs, data for Taylor importance).")
    model, example, order = state.torch_model.eval(), ctx.task.example_inputs(2, "val"), []
    hooks = [m.register_forward_hook(lambda _m, _a, _o, n=n: order.append(n)) for n, m in model.named_modules()
             if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))]
    with torch.no_grad():
        out_shape = tuple(model(*example).shape)
    for h in hooks:
        h.remove()
    if not order:
        raise UsageError(f"{report.technique}: the model runs no Conv or Linear layer; nothing to prune.")
    if cfg.finetune_epochs > 0:
        report.stats["val_before"] = ctx.task.evaluate(model, "val")
    return model, example, out_shape, order[-1], count(model, ctx.task.example_inputs(1, "val"))


def finish(state: ModelState, ctx: StageContext, report: StageReport, before: tuple[int, int],
           example, out_shape, epochs: float) -> None:
    """Check the pruned model runs, fine-tune if asked, record the new shapes and the stats."""
    from ..models import build

    model, stats = state.torch_model, report.stats
    model.zero_grad(set_to_none=True)
    with blame(model.eval(), f"{report.technique}: the pruned model's forward pass"), torch.no_grad():
        shape = tuple(model(*example).shape)
    if shape != out_shape:
        raise ModelError(f"{report.technique}: the output shape changed from {out_shape} to {shape}.")
    if epochs > 0:
        stats["val_after_prune"] = ctx.task.evaluate(model, "val")
        rec = finetune(model, ctx, epochs, report.technique)
        stats["finetune"] = {k: rec[k] for k in ("steps", "epochs", "seconds", "final_loss")}
        stats["val_after_finetune"] = rec["val"]
    try:
        base = build({k: v for k, v in state.spec.items() if k != "reshape"})
    except ModelError:
        base = None  # then every layer's shape is recorded
    state.spec = {**state.spec, "reshape": record_reshape(model, base)}
    macs, params = count(model, ctx.task.example_inputs(1, "val"))
    stats.update(params_before=before[1], params_after=params, macs_before=before[0], macs_after=macs,
                 param_reduction=round(1 - params / before[1], 4),
                 mac_reduction=round(1 - macs / max(before[0], 1), 4))


def _dims(a: dict, b: dict) -> str:
    unit = "features" if a["type"] == "Linear" else "channels"
    keys = {"out": f"out_{unit}", "in": f"in_{unit}", "features": "num_features", "shape": "normalized_shape"}
    return ", ".join(f"{keys[k]} {a[k]} -> {b[k]}" for k in keys if k in a and a[k] != b[k])


@register("channel_prune", ChannelPruneConfig, accepts=(TORCH,),
          summary="remove whole conv channels / hidden neurons (Torch-Pruning dependency graph)")
def channel_prune(state: ModelState, cfg: ChannelPruneConfig, ctx: StageContext) -> StageReport:
    report = StageReport("channel_prune", cfg.model_dump())
    if any(_attrs(m) for m in state.torch_model.modules()):
        raise UsageError("channel_prune does not prune attention encoders (the hidden size is shared "
                         "by every layer, pooling and the head).",
                         "Use head_prune (heads_ratio, ffn_ratio) for text models.")
    model, example, out_shape, out_name, before = setup(state, cfg, ctx, report)
    mods = dict(model.named_modules())
    excl = excluded_by(list(mods), cfg.exclude, "channel_prune")
    shapes0, params0 = layer_shapes(model), free_params(model)
    with blame(model, "channel_prune: tracing the model with Torch-Pruning"), torch.enable_grad():
        pruner = tp.pruner.BasePruner(model, example, importance(cfg), global_pruning=cfg.global_pruning,
                                      pruning_ratio=cfg.ratio, iterative_steps=cfg.iterative_steps,
                                      ignored_layers=[mods[out_name]] + [mods[n] for n in excl],
                                      round_to=cfg.round_to, forward_fn=lambda m, x: m(*x))
        dg, blocked = pruner.DG, {}
        for group in dg.get_all_groups(root_module_types=pruner.root_module_types):
            outs = [n for d, _ in group if dg.is_out_channel_pruning_fn(d.handler)
                    and (n := dg._module2name.get(d.target.module)) is not None]
            kept = [n for n in outs if n == out_name or n in excl]
            blocked.update({n: f"coupled with {kept[0]}, which is kept" for n in outs if kept and n not in kept})
    for step in range(cfg.iterative_steps):
        with blame(model, "channel_prune: ranking channels"), torch.enable_grad():
            if cfg.importance == "taylor":
                taylor_grads(model, cfg, ctx.task)
            for group in pruner.step(interactive=True):
                root = dg._module2name[group[0].dep.target.module]
                with blame(model, f"channel_prune: pruning the group of {root}"):
                    group.prune()
        if cfg.finetune_epochs > 0 and step < cfg.iterative_steps - 1:
            finetune(model, ctx, cfg.finetune_epochs / cfg.iterative_steps, "channel_prune", f"finetune{step}")
    for n, s in layer_shapes(model).items():
        if s != shapes0[n]:
            report.changed[n] = _dims(shapes0[n], s)
        if "out" in s and s["out"] == shapes0[n]["out"]:  # a Conv/Linear whose outputs were kept
            report.skipped[n] = (OUTPUT_KEPT if n == out_name else f"excluded by pattern {excl[n]!r}"
                                 if n in excl else blocked.get(n) or (
                                     "a single output channel" if s["out"] == 1 else "not run in forward"
                                     if mods[n] not in dg.module2node else "no channel removed at this ratio"))
    report.changed.update({n: f"shape {params0[n]} -> {s}" for n, s in free_params(model).items()
                           if s != params0[n]})
    report.stats["layers_pruned"] = sum("out_" in v for v in report.changed.values())
    finish(state, ctx, report, before, example, out_shape, cfg.finetune_epochs / cfg.iterative_steps)
    return report


def rank(scores: dict[str, torch.Tensor], ratio: float, glob: bool, round_to: int | None) -> dict[str, list[int]]:
    """Indices (of heads / neurons) to remove per layer, lowest score first; one unit always stays."""
    out = {}
    if glob and scores:
        flat = torch.cat(list(scores.values()))
        k = math.floor(ratio * flat.numel() + 0.5)
        thres = flat.sort().values[k - 1] if k > 0 else -math.inf
    for name, s in scores.items():
        n = s.numel()
        drop = int((s <= thres).sum()) if glob and scores else math.floor(ratio * n + 0.5)
        if round_to and drop:
            drop = n - max((n - drop) // round_to * round_to, min(round_to, n))
        out[name] = sorted(s.argsort(stable=True)[:min(drop, n - 1)].tolist())
    return out


@register("head_prune", HeadPruneConfig, accepts=(TORCH,),
          summary="remove attention heads and FFN neurons of a BERT-family encoder (hidden size kept)")
def head_prune(state: ModelState, cfg: HeadPruneConfig, ctx: StageContext) -> StageReport:
    report = StageReport("head_prune", cfg.model_dump())
    attn = {n: m for n, m in state.torch_model.named_modules() if _attrs(m) and hasattr(m, "query")}
    if not attn:
        raise UsageError("head_prune needs a BERT-family attention encoder; this model has none.",
                         "Use channel_prune for CNNs and MLPs.")
    model, example, out_shape, out_name, before = setup(state, cfg, ctx, report)
    mods = dict(model.named_modules())
    excl = excluded_by(list(mods), cfg.exclude, "head_prune")
    ffn = {n: n.rsplit(".attention.", 1)[0] + ".intermediate.dense" for n in attn}
    for name, inter in ffn.items():
        if inter not in mods:
            raise ModelError(f"head_prune: {inter} does not exist; {name} is not in a BERT-style layer.")
    heads_before, ffn_before = (sum(a.num_attention_heads for a in attn.values()),
                                sum(mods[f].out_features for f in ffn.values()))
    with blame(model, "head_prune: tracing the model with Torch-Pruning"), torch.enable_grad():
        dg = tp.DependencyGraph().build_dependency(model, example_inputs=example, forward_fn=lambda m, x: m(*x))
        if cfg.importance == "taylor":
            taylor_grads(model, cfg, ctx.task)
    imp, scores = importance(cfg), {"heads": {}, "ffn": {}}
    with blame(model, "head_prune: ranking heads and FFN neurons"):
        for name, a in attn.items():
            group = dg.get_pruning_group(a.query, tp.prune_linear_out_channels, list(range(a.query.out_features)))
            coupled = {d.target.module for d, _ in group}
            if not {a.key, a.value} <= coupled or not any(dg.is_in_channel_pruning_fn(d.handler) and isinstance(
                    d.target.module, nn.Linear) for d, _ in group):
                raise ModelError(f"head_prune: in {name}, query/key/value and the output projection are not "
                                 "coupled in the traced graph; heads cannot be removed consistently.")
            for kind, key, ratio, size in (("heads", name, cfg.heads_ratio, a.attention_head_size),
                                           ("ffn", ffn[name], cfg.ffn_ratio, 1)):
                mod = mods[key] if kind == "ffn" else a.query
                if key in excl:
                    report.skipped[key] = f"excluded by pattern {excl[key]!r}"
                elif ratio == 0:
                    report.skipped[key] = f"{kind}_ratio is 0"
                else:
                    g = dg.get_pruning_group(mod, tp.prune_linear_out_channels, list(range(mod.out_features)))
                    scores[kind][key] = imp(g).view(-1, size).mean(1)
    for kind, ratio, round_to in (("heads", cfg.heads_ratio, None), ("ffn", cfg.ffn_ratio, cfg.round_to)):
        for name, drop in rank(scores[kind], ratio, cfg.global_pruning, round_to).items():
            root, unit = (attn[name].query, attn[name].attention_head_size) if kind == "heads" else (mods[name], 1)
            n = root.out_features // unit
            if not drop:
                report.skipped[name] = f"no {kind} unit removed at this ratio / ranking"
                continue
            with blame(model, f"head_prune: removing {kind} of {name}"):
                idxs = [i * unit + j for i in drop for j in range(unit)]
                dg.get_pruning_group(root, tp.prune_linear_out_channels, idxs).prune()
            if kind == "heads":
                attn[name].num_attention_heads, attn[name].all_head_size = n - len(drop), (n - len(drop)) * unit
            report.changed[name] = f"{kind} {n} -> {n - len(drop)}" + (f" (removed {drop})" if unit > 1 else "")
    hidden = next(iter(attn.values())).query.in_features
    report.skipped["<hidden size>"] = f"hidden size {hidden} kept: embeddings, residuals, pooling, head use it"
    report.skipped[out_name] = OUTPUT_KEPT
    report.stats.update(heads_before=heads_before, heads_after=sum(a.num_attention_heads for a in attn.values()),
                        ffn_before=ffn_before, ffn_after=sum(mods[f].out_features for f in ffn.values()))
    finish(state, ctx, report, before, example, out_shape, cfg.finetune_epochs)
    return report
