"""Quantization-aware fine-tuning (QAT), exported as a QDQ ONNX graph that ONNX Runtime runs in int8.

For when static INT8 (``ort_int8_static``) loses more than the budget. BatchNorm is folded into
the convolution before it first (``fold_bn``: BN frozen for the whole fine-tuning, so what is
trained is what is deployed). Then, in the torch.fx graph of the model, every Conv/Linear weight
is fake-quantized per output channel (symmetric int8; 7 bits where this CPU's U8S8 sums saturate,
as in static INT8) and every tensor entering or leaving those layers (past a ReLU that follows,
and out of residual adds) per tensor (affine uint8, moving-average min/max ranges, started from
``calibration_batches`` train batches). The task fine-tunes the model with the rounding in the
loop (straight-through gradients); the ranges are frozen for the last part. The export turns each
fake-quantization into QuantizeLinear/DequantizeLinear (the TorchScript exporter); the weights'
QuantizeLinear are then folded into int8 initializers, so that the file holds int8 weights and
ONNX Runtime fuses each group into QLinearConv/QGemm. ORT's outputs are checked against the
fake-quant model's.
"""
from __future__ import annotations

import copy
import fnmatch
import operator
from typing import Any, Literal

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import numpy_helper
from pydantic import BaseModel, ConfigDict, Field
from torch import fx, nn

from ..errors import ModelError, UsageError
from ..registry import ONNX, TORCH, TechniqueConfig, register
from ..stage import ModelState, StageContext, StageReport
from .static_ort import integer_counts, ort_graph, resolve_scheme

LAYERS = (nn.Conv1d, nn.Conv2d, nn.Linear)
RELUS = (nn.ReLU, F.relu, torch.relu)
ADDS = (operator.add, torch.add)


class QatTrain(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    epochs: float = Field(default=1.0, gt=0)
    lr: float | None = Field(default=None, gt=0)         # None: a tenth of the task's own
    max_steps: int | None = Field(default=None, ge=1)
    batch_size: int | None = Field(default=None, ge=1)   # None: the task's own


class QatConfig(TechniqueConfig):
    train: QatTrain = QatTrain()
    freeze_after: float = Field(default=0.75, ge=0, le=1)   # fraction of the steps; then ranges are frozen
    reduce_range: Literal["auto"] | bool = "auto"           # 7-bit weights; auto: what this CPU needs
    calibration_batches: int = Field(default=8, ge=1)       # train batches that set the starting ranges
    exclude: list[str] = []                                 # layer-name patterns (fnmatch) kept in float
    opset: int = Field(default=17, ge=13, le=21)
    max_rel_error: float = Field(default=0.1, gt=0)        # ORT vs the fake-quant model, relative to max |output|
    parity_batch: int = Field(default=256, ge=1)


class ActQuant(nn.Module):
    """Fake per-tensor affine uint8 quantization with a moving-average min/max observer."""

    def __init__(self, momentum: float = 0.01):
        super().__init__()
        self.momentum, self.observing = momentum, True
        self.register_buffer("lo", torch.tensor(float("inf")))
        self.register_buffer("hi", torch.tensor(float("-inf")))
        self.register_buffer("scale", torch.ones(1))
        self.register_buffer("zero_point", torch.zeros(1, dtype=torch.int32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observing:
            with torch.no_grad():
                lo, hi = x.detach().min().clamp(max=0), x.detach().max().clamp(min=0)
                first = not torch.isfinite(self.lo)
                self.lo.copy_(lo if first else self.lo + self.momentum * (lo - self.lo))
                self.hi.copy_(hi if first else self.hi + self.momentum * (hi - self.hi))
                scale = ((self.hi - self.lo) / 255).clamp(min=1e-8)
                self.scale.copy_(scale.reshape(1))
                self.zero_point.copy_(torch.round(-self.lo / scale).clamp(0, 255).to(torch.int32).reshape(1))
        return torch.fake_quantize_per_tensor_affine(x, self.scale, self.zero_point, 0, 255)


class QuantLayer(nn.Module):
    """A Conv/Linear whose weight is fake-quantized per output channel (symmetric, zero point 0)."""

    def __init__(self, layer: nn.Module, qmax: int):
        super().__init__()
        self.layer, self.qmin, self.qmax = layer, -qmax - 1, qmax
        self.fixed: torch.Tensor | None = None   # the scale, once the weight is snapped for export
        self.register_buffer("zero_point", torch.zeros(layer.weight.shape[0], dtype=torch.int32))

    def scale(self) -> torch.Tensor:
        if self.fixed is not None:
            return self.fixed
        w = self.layer.weight.detach()
        return (w.abs().amax(dim=tuple(range(1, w.dim()))) / ((self.qmax - self.qmin) / 2)).clamp(min=1e-12)

    def qweight(self) -> torch.Tensor:
        return torch.fake_quantize_per_channel_affine(self.layer.weight, self.scale(), self.zero_point, 0,
                                                      self.qmin, self.qmax)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.qweight()
        if isinstance(self.layer, nn.Linear):
            return F.linear(x, w, self.layer.bias)
        return self.layer._conv_forward(x, w, self.layer.bias)

    def snap_for_export(self) -> None:
        """Put the weight on its int8 grid and widen the range to int8: the same values, in a range
        the ONNX exporter accepts (it takes 8-bit ranges only, not the 7-bit one)."""
        with torch.no_grad():
            self.fixed = self.scale()
            self.layer.weight.copy_(self.qweight())
            self.qmin, self.qmax = -128, 127


def _through(node: fx.Node, mods: dict) -> fx.Node:
    """The node past a ReLU that is the only reader of ``node`` (its quantized range does the same)."""
    if len(node.users) == 1:
        user = next(iter(node.users))
        target = mods.get(user.target) if user.op == "call_module" else user.target
        if isinstance(target, nn.ReLU) or target in RELUS[1:]:
            return user
    return node


def insert_fake_quant(model: nn.Module, qmax: int, exclude: list[str], report: StageReport) -> fx.GraphModule:
    """The model traced with torch.fx, with QuantLayer and ActQuant modules in place."""
    try:
        gm = fx.symbolic_trace(model)
    except Exception as exc:  # data-dependent control flow does not trace
        raise ModelError(f"qat: the model does not trace with torch.fx ({type(exc).__name__}: {str(exc)[:200]}).",
                         "Use ort_int8_static, which works on the exported ONNX graph.") from None
    mods = dict(gm.named_modules())
    for n in list(gm.graph.nodes):  # folded BatchNorms left Identities: drop them, to see layer -> ReLU/add
        if n.op == "call_module" and isinstance(mods[n.target], nn.Identity):
            n.replace_all_uses_with(n.args[0])
            gm.graph.erase_node(n)
    layers = [n for n in gm.graph.nodes if n.op == "call_module" and isinstance(mods[n.target], LAYERS)]
    for pat in exclude:
        if not any(fnmatch.fnmatchcase(n.target, pat) for n in layers):
            raise UsageError(f"qat.exclude: pattern {pat!r} matches no Conv/Linear layer.",
                             f"Layers: {', '.join(n.target for n in layers)[:300]}")
    quantized, tensors = [], []
    for n in layers:
        if any(fnmatch.fnmatchcase(n.target, p) for p in exclude):
            report.skipped[n.target] = "excluded by pattern"
            continue
        layer = mods[n.target]
        gm.set_submodule(n.target, QuantLayer(layer, qmax))
        quantized.append(n)
        report.changed[n.target] = (f"{type(layer).__name__}: fake-quantized int8 weights "
                                    f"({'7-bit, ' if qmax == 63 else ''}per channel), uint8 activations")
        tensors.append(n.args[0])
        tensors.append(_through(n, mods))
    for n in gm.graph.nodes:  # residual adds of quantized tensors: quantize their output too
        if n.op == "call_function" and n.target in ADDS and all(a in tensors for a in n.args[:2]):
            tensors.append(_through(n, mods))
    outputs: set[fx.Node] = set()
    for n in gm.graph.nodes:
        if n.op == "output":
            fx.node.map_arg(n.args, outputs.add)
    count = 0
    for t in dict.fromkeys(tensors):  # once per tensor, in order
        if not isinstance(t, fx.Node) or t in outputs:
            continue  # graph outputs (logits) stay float
        name = f"act_quant_{count}"
        count += 1
        gm.add_submodule(name, ActQuant())
        with gm.graph.inserting_after(t):
            q = gm.graph.call_module(name, (t,))
        t.replace_all_uses_with(q, delete_user_cb=lambda user: user is not q)
    gm.graph.lint()
    gm.recompile()
    report.stats.update(quantized_layers=len(quantized), activation_quantizers=count)
    return gm


def set_observing(model: nn.Module, on: bool) -> None:
    for m in model.modules():
        if isinstance(m, ActQuant):
            m.observing = on


def tidy_qdq(path) -> int:
    """Make the exported QDQ graph what ONNX Runtime fuses and what should be shipped: each
    QuantizeLinear of a constant weight becomes the int8 tensor it makes, the exporter's Identity
    aliases of constants go, and 1-element scales/zero points become scalars (ONNX Runtime fuses
    DQ -> Add -> Q into QLinearAdd only then). Returns the number of weights folded."""
    m = onnx.load(str(path))
    g = m.graph
    inits = {t.name for t in g.initializer}
    alias = {n.output[0]: n.input[0] for n in g.node if n.op_type == "Identity" and n.input[0] in inits}
    consts = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    consts.update({n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in g.node
                   if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"})
    keep, new = [], []
    for n in g.node:
        if n.op_type == "Identity" and n.output[0] in alias:
            continue
        n.input[:] = [alias.get(i, i) for i in n.input]
        if n.op_type == "QuantizeLinear" and n.input[0] in inits and all(i in consts for i in n.input[1:3]):
            w, scale, zp = consts[n.input[0]], consts[n.input[1]], consts[n.input[2]]
            axis = next((a.i for a in n.attribute if a.name == "axis"), 1)
            shape = [1] * w.ndim
            if scale.size > 1:
                shape[axis] = -1
            info = np.iinfo(zp.dtype)
            q = np.clip(np.rint(w / scale.reshape(shape)) + zp.reshape(shape).astype(np.int32), info.min, info.max)
            new.append(numpy_helper.from_array(q.astype(zp.dtype), n.output[0]))
            continue
        keep.append(n)
    del g.node[:]
    g.node.extend(keep)
    g.initializer.extend(new)
    params = {n.input[k] for n in g.node if n.op_type in ("QuantizeLinear", "DequantizeLinear") for k in (1, 2)
              if len(n.input) > k}
    used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
    live = []
    for t in g.initializer:
        if t.name in params and list(t.dims) == [1]:
            t = numpy_helper.from_array(numpy_helper.to_array(t).reshape(()), t.name)
        if t.name in used:
            live.append(t)
    del g.initializer[:]
    g.initializer.extend(live)
    onnx.save(m, str(path))
    return len(new)


def _train_config(ctx: StageContext, cfg: QatConfig):
    base = ctx.task.train_config("full")
    update: dict[str, Any] = {"epochs": cfg.train.epochs, "lr": cfg.train.lr or base.lr / 10}
    if cfg.train.max_steps:
        update["max_steps"] = cfg.train.max_steps
    if cfg.train.batch_size:
        update["batch_size"] = cfg.train.batch_size
    return base.model_copy(update=update)


@register("qat", QatConfig, accepts=(TORCH,), produces=ONNX,
          summary="quantization-aware fine-tuning, exported as a QDQ int8 ONNX graph (ONNX Runtime)")
def qat(state: ModelState, cfg: QatConfig, ctx: StageContext) -> StageReport:
    from ..accelerate.fold import FoldBnConfig, fold_bn
    from ..accelerate.onnx_export import export_onnx
    from ..trainer import Callback

    if ctx.task is None:
        raise UsageError("qat fine-tunes on the task's data and needs a task.",
                         "Run the stage within `slimcart compress` (or give the StageContext a task).")
    report = StageReport("qat", cfg.model_dump())
    task, metric = ctx.task, ctx.task.primary_metric
    float_model = copy.deepcopy(state.torch_model).eval()
    folded = ModelState.from_module(float_model, state.spec)
    fold = fold_bn(folded, FoldBnConfig(), ctx)
    report.changed.update({k: f"BatchNorm {v} before fake quantization (frozen while fine-tuning)"
                           for k, v in fold.changed.items() if v.startswith("folded into")})
    scheme = resolve_scheme("auto", "auto", cfg.reduce_range, report)
    model = insert_fake_quant(folded.torch_model, 63 if scheme["reduce_range"] else 127, cfg.exclude, report)
    model.eval()
    bs = task.train_config("full").batch_size
    with torch.no_grad():  # starting ranges from real batches
        for x, _ in task.batches("train", bs, shuffle=True, limit=cfg.calibration_batches * bs):
            model(*x)
    set_observing(model, False)
    before = task.evaluate(model, "val")[metric]
    set_observing(model, True)
    tcfg = _train_config(ctx, cfg)

    class Freeze(Callback):
        def on_step_end(self, trainer) -> None:
            if trainer.step >= cfg.freeze_after * trainer.total:
                set_observing(trainer.model, False)

    record = task.train_model(model, tcfg, progress=ctx.progress, desc="quantization-aware fine-tuning",
                              callbacks=[Freeze()], **ctx.train_checkpoint("qat"))
    set_observing(model, False)
    model.eval()
    for m in model.modules():
        if isinstance(m, QuantLayer):
            m.snap_for_export()
    path = export_onnx(model, task.example_inputs(2, "val"), ctx.path("qat.onnx"), task.input_names,
                       task.dynamic_axes(), cfg.opset)
    folded_q = tidy_qdq(path)
    fused = ort_graph(path, ctx.path("qat.ort.onnx"))
    report.stats.update({"val_float": task.evaluate(float_model, "val")[metric], "val_fake_quant_before": before,
                         "val_fake_quant_after": record["val"][metric], "metric": metric,
                         "train": {k: record[k] for k in ("steps", "epochs", "seconds", "final_loss")},
                         "lr": tcfg.lr, "weights_folded_to_int8": folded_q,
                         "integer_ops_after_ort_optimization": integer_counts(fused)})
    parity = _parity(task, model, path, cfg.parity_batch)
    report.stats.update(parity)
    report.notes.append(f"QAT: {metric} on val {before:.4f} with fake quantization before fine-tuning, "
                        f"{record['val'][metric]:.4f} after; ONNX Runtime vs the fake-quant model: top-1 agreement "
                        f"{parity.get('agreement_top1_agreement', float('nan')):.4f}, max relative error "
                        f"{parity['max_rel_error']:.3g}.")
    if parity["max_rel_error"] > cfg.max_rel_error:
        raise ModelError(f"qat: ONNX Runtime disagrees with the fake-quant model: max relative error "
                         f"{parity['max_rel_error']:.3g} (bound {cfg.max_rel_error}).",
                         "Raise max_rel_error in the stage if this is expected.")
    state.format, state.onnx_path, state.torch_model = ONNX, path, None
    state.quant = {"scheme": "qat", "format": "QDQ", **scheme, "per_channel": True}
    return report


def _parity(task, model: nn.Module, path, rows: int) -> dict:
    """ONNX Runtime's outputs against the fake-quant model's, on validation rows."""
    from ..measure.runtimes import OrtRunner

    x = task.example_inputs(rows, "val")
    with torch.inference_mode():
        ref = model(*x).float().numpy()
    got = OrtRunner(path, task.input_names)(x)
    err = float(np.abs(got - ref).max())
    out = {"parity_reference": "the fake-quant PyTorch model", "parity_rows": int(ref.shape[0]),
           "max_abs_error": err, "max_rel_error": err / max(float(np.abs(ref).max()), 1e-12),
           "mean_abs_error": float(np.abs(got - ref).mean())}
    if hasattr(task, "agreement"):
        out.update({f"agreement_{k}": v for k, v in task.agreement(ref, got).items()})
    return out
