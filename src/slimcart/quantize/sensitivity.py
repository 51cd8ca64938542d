"""Per-layer quantization sensitivity and mixed precision.

``layer_sensitivity`` quantizes one layer at a time and measures the SQNR of that layer's output
against float on calibration rows (train split) and the drop of the task's primary metric on the
validation split with only that layer quantized, in points (100 x the metric: 0.8 pt of
accuracy = 0.008). ``rank_layers`` puts the most sensitive first (largest drop, then lowest
SQNR); ``choose_float`` picks the prefix to keep in float. ``int8_mixed`` (PyTorch dynamic INT8)
and ``ort_int8_mixed`` (ONNX Runtime dynamic INT8) keep layers in float in that order until the
measured drop of the mixed model on validation is within ``max_drop`` points, or keep the
``keep_float`` most sensitive. Stats carry ``{"sensitivity": {..., "layers": [{"name", "op",
"sqnr_db", "metric_drop", "decision"}]}}``.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
from pydantic import Field
from torch import nn

from ..errors import ModelError, UsageError
from ..registry import ONNX, TORCH, TORCH_INT8, TechniqueConfig, register
from ..stage import ModelState, StageContext, StageReport
from .dynamic import Int8DynamicConfig, quantize_like
from .ort import OrtInt8DynamicConfig, _quantized_nodes, ort_int8_dynamic


def sqnr_db(ref: torch.Tensor, approx: torch.Tensor) -> float:
    """10 log10(signal energy / error energy); inf when ``approx`` equals ``ref``."""
    ref, approx = torch.as_tensor(ref).double(), torch.as_tensor(approx).double()
    noise = float((ref - approx).pow(2).sum())
    return math.inf if noise == 0 else 10 * math.log10(max(float(ref.pow(2).sum()), 1e-300) / noise)


def drop_points(task, baseline: float, value: float) -> float:
    """How much worse ``value`` is than ``baseline`` in points of the metric (positive: worse)."""
    d = (baseline - value) if task.higher_is_better else (value - baseline)
    return math.inf if math.isnan(d) else 100.0 * d


def _row(name: str, op: str, energy: tuple[float, float], drop: float) -> dict[str, Any]:
    signal, noise = energy
    db = None if noise == 0 else round(10 * math.log10(max(signal, 1e-300) / noise), 2)
    return {"name": name, "op": op, "sqnr_db": db, "metric_drop": round(drop, 3), "decision": None}


def layer_sensitivity(model: nn.Module, task, quantize_one: Callable[[nn.Module], nn.Module],
                      layers: Iterable[str], limit: int | None = None, *, calib_rows: int = 64,
                      split: str = "val") -> dict[str, Any]:
    """Quantize each of ``layers`` alone with ``quantize_one(layer) -> replacement module``. The
    model is left as it was. Returns ``{"metric", "split", "limit", "baseline", "unit",
    "layers": [{"name", "op", "sqnr_db", "metric_drop", "decision": None}]}``."""
    from ..models.weight_only_linear import replace_linear

    model.eval()
    originals = {n: model.get_submodule(n) for n in layers}
    quant = {n: quantize_one(m) for n, m in originals.items()}
    energy = {n: [0.0, 0.0] for n in originals}

    def hook(name):
        def fn(_mod, args, out):
            q = quant[name](*args)
            energy[name][0] += float(out.double().pow(2).sum())
            energy[name][1] += float((out.double() - q.double()).pow(2).sum())
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in originals.items()]
    try:
        with torch.inference_mode():
            for x, _ in task.batches("train", 32, limit=calib_rows):
                model(*x)
    finally:
        for h in handles:
            h.remove()
    metric = task.primary_metric
    base = task.evaluate(model, split, limit)[metric]
    rows = []
    for name, layer in originals.items():
        replace_linear(model, name, quant[name])
        try:
            value = task.evaluate(model, split, limit)[metric]
        finally:
            replace_linear(model, name, layer)
        rows.append(_row(name, type(layer).__name__, tuple(energy[name]), drop_points(task, base, value)))
    return {"metric": metric, "split": split, "limit": limit, "baseline": base, "unit": "points", "layers": rows}


def rank_layers(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Most sensitive first: largest metric drop, then lowest SQNR (an exact layer last)."""
    return sorted(rows, key=lambda r: (-r["metric_drop"], math.inf if r["sqnr_db"] is None else r["sqnr_db"]))


def choose_float(ranked: list[dict[str, Any]], max_drop: float | None = None,
                 keep_float: int | None = None) -> list[str]:
    """The most sensitive layers to keep in float: the first ``keep_float``, or as many as it takes
    for the sum of the other layers' positive drops (the additive estimate) to fit ``max_drop``."""
    if keep_float is not None:
        return [r["name"] for r in ranked[:keep_float]]
    est = sum(max(r["metric_drop"], 0.0) for r in ranked)
    keep = []
    for r in ranked:
        if est <= (max_drop or 0.0):
            break
        keep.append(r["name"])
        est -= max(r["metric_drop"], 0.0)
    return keep


def mix(scan: dict[str, Any], cfg, measure: Callable[[list[str]], float], report: StageReport, fmt: str
        ) -> list[str]:
    """Choose the float layers, check the mixed model's drop with ``measure(keep) -> points`` (in
    ``max_drop`` mode: keep one more layer while it is over budget), and record every decision."""
    ranked = rank_layers(scan["layers"])
    keep = choose_float(ranked, cfg.max_drop, cfg.keep_float)
    estimate = sum(max(r["metric_drop"], 0.0) for r in ranked if r["name"] not in keep)
    measured = measure(keep)
    while cfg.keep_float is None and measured > cfg.max_drop and len(keep) < len(ranked):
        keep.append(ranked[len(keep)]["name"])
        measured = measure(keep)
    for i, r in enumerate(ranked):
        db = "exact" if r["sqnr_db"] is None else f"{r['sqnr_db']:.1f} dB"
        text = f"drop {r['metric_drop']:.2f} pt, SQNR {db}, rank {i + 1}/{len(ranked)}"
        r["decision"] = "float" if r["name"] in keep else fmt
        if r["name"] in keep:
            report.skipped[r["name"]] = f"kept float: {text}"
        else:
            report.changed[r["name"]] = f"{r['op']} -> {fmt}: {text}"
    report.stats.update({
        "sensitivity": {k: v for k, v in scan.items() if k != "layers"} | {"layers": ranked},
        "kept_float": len(keep), "quantized_layers": len(ranked) - len(keep),
        "estimated_drop_pts": round(estimate, 3), "measured_drop_pts": round(measured, 3),
        "max_drop_pts": cfg.max_drop if cfg.keep_float is None else None})
    if cfg.keep_float is None and measured > cfg.max_drop:
        report.notes.append(f"even with every layer in float the validation drop is {measured:.2f} pt "
                            f"(budget {cfg.max_drop} pt): the rows scored are too few to resolve it")
    return keep


class MixedFields(TechniqueConfig):
    """Settings shared by the mixed-precision techniques."""

    max_drop: float = Field(default=0.5, ge=0)          # points of the primary metric on validation
    keep_float: int | None = Field(default=None, ge=0)  # instead: keep this many most sensitive layers
    limit: int | None = Field(default=512, ge=1)        # validation rows scored per layer (None: all)
    calib_rows: int = Field(default=64, ge=1)           # training rows for the SQNR of each layer


# ---- PyTorch dynamic INT8 ---------------------------------------------------------------------

class Int8MixedConfig(Int8DynamicConfig, MixedFields):
    """int8_dynamic's settings plus the mixed-precision ones."""


def _quantize_layer(per_channel: bool) -> Callable[[nn.Module], nn.Module]:
    def one(layer: nn.Module) -> nn.Module:
        holder = nn.Module()
        holder.add_module("layer", layer)
        return quantize_like(holder, {"per_channel": per_channel, "layers": ["layer"]}).layer
    return one


@register("int8_mixed", Int8MixedConfig, accepts=(TORCH,), produces=TORCH_INT8,
          summary="dynamic INT8 (PyTorch) with the most quantization-sensitive Linear layers kept in float")
def int8_mixed(state: ModelState, cfg: Int8MixedConfig, ctx: StageContext) -> StageReport:
    import fnmatch

    report = StageReport("int8_mixed", cfg.model_dump())
    model, task = state.torch_model.eval(), ctx.task
    names = [n for n, _ in model.named_modules()]
    for pat in cfg.exclude:
        if not any(fnmatch.fnmatchcase(n, pat) for n in names):
            raise UsageError(f"int8_mixed.exclude: pattern {pat!r} matches no layer of the model.",
                             "List layer names with `slimcart inspect MODEL_DIR`.")
    layers = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            if any(fnmatch.fnmatchcase(name, p) for p in cfg.exclude):
                report.skipped[name] = "excluded by pattern"
            else:
                layers.append(name)
    if not layers:
        raise UsageError("int8_mixed: the model has no Linear layer to quantize (after exclude).")
    scan = layer_sensitivity(model, task, _quantize_layer(cfg.per_channel), layers, cfg.limit,
                             calib_rows=cfg.calib_rows)

    def quant(keep: list[str]) -> dict[str, Any]:
        return {"scheme": "dynamic", "per_channel": cfg.per_channel, "layers": [n for n in layers if n not in keep]}

    last: dict[str, nn.Module] = {}

    def measure(keep: list[str]) -> float:
        last["model"] = quantize_like(model, quant(keep))
        value = task.evaluate(last["model"], "val", cfg.limit)[task.primary_metric]
        return drop_points(task, scan["baseline"], value)

    keep = mix(scan, cfg, measure, report, "int8")  # measures the chosen mix last
    state.quant = quant(keep)
    state.torch_model = last["model"]
    state.format = TORCH_INT8
    return report


# ---- ONNX Runtime dynamic INT8 ----------------------------------------------------------------

class OrtInt8MixedConfig(OrtInt8DynamicConfig, MixedFields):
    """ort_int8_dynamic's settings plus the mixed-precision ones."""


def _ort_quantize(src: Path, dst: Path, cfg: OrtInt8DynamicConfig, **nodes) -> Path:
    """ONNX Runtime's dynamic quantizer with the settings of ``ort_int8_dynamic`` plus
    ``nodes_to_quantize`` / ``nodes_to_exclude``."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(src), str(dst), per_channel=cfg.per_channel, reduce_range=cfg.reduce_range,
                     weight_type=QuantType.QInt8 if cfg.weight_type == "int8" else QuantType.QUInt8,
                     op_types_to_quantize=list(cfg.op_types), **nodes)
    return dst


def _ort_batches(path: Path, task, split: str, limit: int | None, fetch: list[str] | None,
                 batch: int = 256) -> list[list[np.ndarray]]:
    """The ``fetch`` outputs (None: all) of the graph at ``path``, per batch of ``split``."""
    from ..measure.runtimes import OrtRunner

    runner = OrtRunner(path, task.input_names)
    return [runner.session.run(fetch, {n: t.numpy() for n, t, u in zip(runner.input_names, x, runner.used) if u})
            for x, _ in task.batches(split, batch, limit=limit)]


def _ort_metric(path: Path, task, limit: int | None, fetch: list[str] | None = None) -> float:
    logits = np.concatenate([b[0] for b in _ort_batches(path, task, "val", limit, fetch)], axis=0)
    return task.metrics(logits, task.labels("val", limit))[task.primary_metric]


@register("ort_int8_mixed", OrtInt8MixedConfig, accepts=(ONNX,),
          summary="dynamic INT8 of the ONNX graph with the most sensitive nodes kept in float (ONNX Runtime)")
def ort_int8_mixed(state: ModelState, cfg: OrtInt8MixedConfig, ctx: StageContext) -> StageReport:
    import onnx

    report = StageReport("ort_int8_mixed", cfg.model_dump())
    task = ctx.task
    base_cfg = OrtInt8DynamicConfig(**{k: getattr(cfg, k) for k in OrtInt8DynamicConfig.model_fields})
    full_state = ModelState(ONNX, state.spec, onnx_path=state.require_onnx())
    ort_int8_dynamic(full_state, base_cfg, ctx)  # pre-processes, then quantizes every node it can
    src = ctx.path("preprocessed.onnx") if cfg.preprocess else state.require_onnx()
    graph = onnx.load(str(src))
    # names as the quantizer knows them (it splits a Gemm X into X_MatMul + X_Add before choosing)
    done = _quantized_nodes(onnx.load(str(full_state.onnx_path)).graph)
    layers: dict[str, Any] = {}
    for n in graph.graph.node:
        name = n.name if n.name in done else f"{n.name}_MatMul" if f"{n.name}_MatMul" in done else None
        if name:
            layers[name] = n
        elif n.op_type in cfg.op_types:
            report.skipped[n.name] = f"{n.op_type}: left in float by the quantizer (no constant weight input)"
    if not layers:
        raise ModelError(f"ort_int8_mixed: ONNX Runtime's quantizer quantizes no {'/'.join(cfg.op_types)} node "
                         "of this graph, so there is nothing to choose.", "Check op_types.")
    logits = graph.graph.output[0].name
    for n in layers.values():  # expose every candidate's output for its SQNR
        graph.graph.output.append(onnx.helper.make_tensor_value_info(n.output[0], onnx.TensorProto.FLOAT, None))
    probe = ctx.path("probe.onnx")
    onnx.save(graph, str(probe))
    del graph
    tensors = [n.output[0] for n in layers.values()]
    # float outputs of every candidate per calibration batch (batches differ in padded length)
    ref = _ort_batches(probe, task, "train", cfg.calib_rows, tensors, batch=32)
    metric, base = task.primary_metric, _ort_metric(src, task, cfg.limit)
    rows = []
    one = ctx.path("one-node.onnx")
    for i, (name, node) in enumerate(layers.items()):
        _ort_quantize(probe, one, cfg, nodes_to_quantize=[name])
        got = _ort_batches(one, task, "train", cfg.calib_rows, [tensors[i]], batch=32)
        signal = sum(float(np.square(r[i].astype(np.float64)).sum()) for r in ref)
        noise = sum(float(np.square(r[i].astype(np.float64) - g[0]).sum()) for r, g in zip(ref, got))
        rows.append(_row(name, node.op_type, (signal, noise),
                         drop_points(task, base, _ort_metric(one, task, cfg.limit, [logits]))))
    del ref
    scan = {"metric": metric, "split": "val", "limit": cfg.limit, "baseline": base, "unit": "points", "layers": rows}
    out = ctx.path("int8-mixed.onnx")

    def measure(keep: list[str]) -> float:
        path = _ort_quantize(src, out, cfg, nodes_to_exclude=list(keep)) if keep else full_state.onnx_path
        return drop_points(task, base, _ort_metric(path, task, cfg.limit))

    keep = mix(scan, cfg, measure, report, "int8")  # measures (and so writes) the chosen mix last
    final = out if keep else full_state.onnx_path
    done = _quantized_nodes(onnx.load(str(final)).graph)
    for name in list(report.changed):
        if name not in done:
            report.skipped[name] = "left in float by the quantizer"
            del report.changed[name]
    state.onnx_path = final
    probe.unlink(missing_ok=True)
    one.unlink(missing_ok=True)
    return report
