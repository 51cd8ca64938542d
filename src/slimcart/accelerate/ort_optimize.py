"""ONNX Runtime's graph optimisations applied offline: the optimised graph is saved as the
variant's model.onnx (SessionOptions.optimized_model_filepath), checked against eager.

Levels: ``basic`` (constant folding, redundant-node removal; portable), ``extended`` (fusions into
ONNX Runtime's contrib ops: GELU, LayerNorm, attention...; for the CPU and CUDA providers) and
``all`` (adds layout transforms such as NCHWc convolutions that fit the CPU and provider the graph
was optimised on: serve it there). ONNX Runtime also applies these at session start (slimcart's
onnxruntime runtime uses level all), so the saved graph mainly saves start-up work and pins what
is served.
"""
from __future__ import annotations

import collections
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
import torch
from pydantic import Field

from ..errors import ModelError
from ..registry import ONNX, TechniqueConfig, register
from ..stage import ModelState, StageContext, StageReport

LEVELS = {"basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED", "all": "ORT_ENABLE_ALL"}
QUANT_OPS = {"DynamicQuantizeLinear", "QuantizeLinear", "DequantizeLinear", "MatMulInteger", "ConvInteger",
             "DynamicQuantizeMatMul", "QAttention", "QEmbedLayerNormalization", "QGemm", "QLinearConv",
             "QLinearMatMul", "MatMulIntegerToFloat"}


class ParityBounds(TechniqueConfig):
    max_abs_error: float = Field(default=1e-4, gt=0)  # exceeding both bounds fails the stage
    max_rel_error: float = Field(default=1e-4, gt=0)  # relative to the largest reference output
    parity_batch: int = Field(default=64, ge=1)


class OrtOptimizeConfig(ParityBounds):
    level: Literal["basic", "extended", "all"] = "extended"
    provider: str = "CPUExecutionProvider"             # the graph is optimised for this provider


def op_counts(path: Path) -> dict[str, int]:
    return dict(collections.Counter(n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node))


def is_quantized(path: Path) -> bool:
    return bool(QUANT_OPS & set(op_counts(path)))


def check_parity(stage: str, state: ModelState, before: Path, after: Path, ctx: StageContext,
                 cfg: ParityBounds) -> dict:
    """Outputs of the new graph against eager PyTorch (when the model has a float eager version and
    the input graph is not quantized) or else against the input graph; a ModelError past the bounds."""
    from ..measure.runtimes import OrtRunner

    task = ctx.task
    x = task.example_inputs(cfg.parity_batch, "val")
    got = OrtRunner(after, task.input_names)(x)
    stats = {"parity_rows": int(got.shape[0])}
    if state.torch_model is not None:
        with torch.inference_mode():
            eager = state.torch_model.eval()(*x).float().numpy()
        stats["max_abs_error_vs_eager"] = float(np.abs(got - eager).max())
    if state.torch_model is not None and not is_quantized(before):
        ref, stats["parity_reference"] = eager, "eager PyTorch"
    else:
        ref = OrtRunner(before, task.input_names, optimization="disable")(x)
        stats["parity_reference"] = "the input ONNX graph" + (" (quantized: eager is no reference)"
                                                               if state.torch_model is not None else "")
        stats["max_abs_error_vs_input_graph"] = float(np.abs(got - ref).max())
    err = float(np.abs(got - ref).max())
    stats.update(max_abs_error=err, max_rel_error=err / max(float(np.abs(ref).max()), 1e-12))
    if err > cfg.max_abs_error and stats["max_rel_error"] > cfg.max_rel_error:
        raise ModelError(f"{stage}: the optimised graph disagrees with {stats['parity_reference']}: max abs "
                         f"error {err:.3g}, relative {stats['max_rel_error']:.3g} (bounds {cfg.max_abs_error}, "
                         f"{cfg.max_rel_error}).", "Raise max_abs_error / max_rel_error in the stage if this "
                         "is expected, or use a lower optimisation level.")
    return stats


@register("ort_optimize", OrtOptimizeConfig, accepts=(ONNX,),
          summary="ONNX Runtime graph optimisation (basic / extended / all) saved offline, checked against eager")
def ort_optimize(state: ModelState, cfg: OrtOptimizeConfig, ctx: StageContext) -> StageReport:
    import onnxruntime as ort

    report = StageReport("ort_optimize", cfg.model_dump())
    src = Path(state.require_onnx())
    if cfg.provider not in ort.get_available_providers():
        raise ModelError(f"ort_optimize: provider {cfg.provider!r} is not available in this ONNX Runtime "
                         f"(available: {', '.join(ort.get_available_providers())}).",
                         "Optimise on the machine and provider you will serve with.")
    out = ctx.path("optimized.onnx")
    opts = ort.SessionOptions()
    opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, LEVELS[cfg.level])
    opts.optimized_model_filepath = str(out)
    opts.log_severity_level = 3
    try:
        ort.InferenceSession(str(src), opts, providers=[cfg.provider])
    except Exception as exc:  # ONNX Runtime raises its own types for graphs it cannot load
        raise ModelError(f"ort_optimize: ONNX Runtime cannot optimise {src.name}: {str(exc)[:300]}") from None
    before, after = op_counts(src), op_counts(out)
    for op in sorted(set(before) | set(after)):
        if before.get(op, 0) != after.get(op, 0):
            report.changed[op] = f"{before.get(op, 0)} -> {after.get(op, 0)} nodes"
    report.stats.update(level=cfg.level, optimized_for=cfg.provider, onnxruntime=ort.__version__,
                        nodes_before=sum(before.values()), nodes_after=sum(after.values()))
    if cfg.level == "all":
        report.notes.append(f"level 'all' graphs hold layout-specific fused ops for {cfg.provider} on this "
                                "CPU kind (e.g. NCHWc convolutions); serve it with that provider on a like CPU")
    report.stats.update(check_parity("ort_optimize", state, src, out, ctx, cfg))
    state.onnx_path = out
    return report
