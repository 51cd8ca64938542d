"""ONNX Runtime's transformer optimizer on a BERT-family graph: attention, embedding + LayerNorm,
skip + LayerNorm and bias + GELU fused into ONNX Runtime's contrib ops, checked against eager.

The optimizer matches the attention pattern of the eager ("eager" attn_implementation) BERT
forward; transformers' SDPA attention exports to a graph it does not match. So when the graph is
still the plain float export of an SDPA model, the model is re-exported with eager attention (the
same arithmetic) before fusing (``eager_attention``). The fused graph is annotated with ONNX
Runtime's symbolic shape inference, which knows its contrib ops, so that ``ort_int8_dynamic`` can
follow (with op_types Attention and EmbedLayerNormalization it quantizes the fused ops' weights).

``skip_layer_norm``: ONNX Runtime's CPU SkipLayerNormalization kernel (residual add + LayerNorm in
one op) was measured 2.7x slower than Add + LayerNormalization at batch 32 x 55 tokens x 384 on a
2-core Xeon (ONNX Runtime 1.32). ``false`` leaves the residual adds unfused and tags the graph
(metadata ``slimcart.ort.disabled_optimizers``) so that every ONNX Runtime session slimcart opens
on it, in measurement and serving, keeps ONNX Runtime's own SkipLayerNormFusion off; ``auto``
builds both graphs, times them here at batch 1 and 32 and keeps the faster (the timings are in the
stage's stats).
"""
from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Literal

import onnx
from pydantic import Field

from ..errors import ModelError
from ..measure.runners import DISABLED_OPTIMIZERS_KEY
from ..registry import ONNX, register
from ..stage import ModelState, StageContext, StageReport
from .ort_optimize import ParityBounds, check_parity, is_quantized, op_counts

HINT = "Use ort_optimize (ONNX Runtime's generic graph optimisation) for CNNs, MLPs and DeepFM."


class OrtTransformerOptimizeConfig(ParityBounds):
    num_heads: int | None = Field(default=None, ge=1)    # None: read from the model
    hidden_size: int | None = Field(default=None, ge=1)  # q/k/v width; None: read from the model
    eager_attention: bool = True   # re-export an SDPA model with eager attention so that it fuses
    opt_level: Literal[0, 1] = 0   # 1: ONNX Runtime's basic optimisations before the Python fusions
    skip_layer_norm: bool | Literal["auto"] = True  # fuse residual add + LayerNorm (see the module doc)


def transformer_config(model):
    """The Hugging Face config of the model's transformer encoder, or None."""
    for m in model.modules():
        cfg = getattr(m, "config", None)
        if isinstance(getattr(cfg, "num_attention_heads", None), int) and isinstance(
                getattr(cfg, "hidden_size", None), int):
            return cfg
    return None


def _sizes(state: ModelState, cfg: OrtTransformerOptimizeConfig) -> tuple[int, int, str]:
    """(num_heads, hidden_size, where they came from); 0 lets the optimizer detect them."""
    from ..models.reshape import _attrs

    if state.torch_model is None:
        return cfg.num_heads or 0, cfg.hidden_size or 0, "given" if cfg.num_heads else "detected from the graph"
    hf = transformer_config(state.torch_model)
    if hf is None:
        raise ModelError("ort_transformer_optimize: the model is not a BERT-family transformer (no Hugging Face "
                         "config with num_attention_heads and hidden_size).", HINT)
    attn = [a for m in state.torch_model.modules() if (a := _attrs(m))]
    sizes = {(a["num_attention_heads"], a["all_head_size"]) for a in attn} or {(hf.num_attention_heads, hf.hidden_size)}
    if len(sizes) > 1:  # head_prune left layers with different head counts: one size cannot fit all
        return (cfg.num_heads or 0, cfg.hidden_size or 0,
                f"detected from the graph (per-layer heads, q/k/v sizes: {sorted(sizes)})")
    heads, width = sizes.pop()
    where = "model config" if (heads, width) == (hf.num_attention_heads, hf.hidden_size) else \
        "the attention layers (heads pruned)"
    return cfg.num_heads or heads, cfg.hidden_size or width, where


def _plain_export(path: Path) -> bool:
    """True if the graph holds only standard, unquantized ONNX ops (as onnx_export writes it)."""
    model = onnx.load(str(path), load_external_data=False)
    return all(n.domain in ("", "ai.onnx") for n in model.graph.node) and not is_quantized(path)


def _eager_reexport(state: ModelState, src: Path, ctx: StageContext) -> Path | None:
    """The model re-exported with eager attention, if it uses SDPA and ``src`` is its plain export."""
    from .onnx_export import export_onnx

    hf = transformer_config(state.torch_model)
    if getattr(hf, "_attn_implementation", "eager") == "eager" or not _plain_export(src):
        return None
    model = copy.deepcopy(state.torch_model).eval()
    for m in model.modules():
        if hasattr(m, "set_attn_implementation") and getattr(m, "config", None) is not None:
            m.set_attn_implementation("eager")
    opset = next(o.version for o in onnx.load(str(src), load_external_data=False).opset_import
                 if o.domain in ("", "ai.onnx"))
    task = ctx.task
    return export_onnx(model, task.example_inputs(2, "val"), ctx.path("eager-attention.onnx"),
                       task.input_names, task.dynamic_axes(), opset)


def _optimize(graph: Path, heads: int, hidden: int, cfg: OrtTransformerOptimizeConfig, sln: bool):
    """(fused ModelProto, fused-op counts, shape-inference note); without ``sln`` the residual adds
    stay unfused and the graph is tagged to keep ONNX Runtime's SkipLayerNormFusion off."""
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    options = FusionOptions("bert")
    options.enable_skip_layer_norm = sln
    try:
        opt = optimize_model(str(graph), model_type="bert", num_heads=heads, hidden_size=hidden,
                             opt_level=cfg.opt_level, use_gpu=False, optimization_options=options)
    except Exception as exc:  # the optimizer raises assorted errors on graphs it cannot follow
        raise ModelError(f"ort_transformer_optimize: ONNX Runtime's transformer optimizer failed: "
                         f"{type(exc).__name__}: {str(exc)[:300]}", HINT) from None
    fused = {op: n for op, n in opt.get_fused_operator_statistics().items() if n}
    if not fused:
        raise ModelError("ort_transformer_optimize: the optimizer fused nothing; this is not a BERT-style graph.", HINT)
    try:
        model = SymbolicShapeInference.infer_shapes(opt.model, auto_merge=True)
        note = "symbolic (types annotated for ort_int8_dynamic)"
    except Exception as exc:  # then ort_int8_dynamic may not find weight types; the graph itself is fine
        model, note = opt.model, f"failed ({type(exc).__name__}); ort_int8_dynamic may not follow"
    if not sln:
        onnx.helper.set_model_props(model, {**{p.key: p.value for p in model.metadata_props},
                                            DISABLED_OPTIMIZERS_KEY: "SkipLayerNormFusion"})
    return model, fused, note


def _time(models: dict, ctx: StageContext) -> dict[str, dict[str, float]]:
    """p50 ms of ONNX Runtime on each graph of ``models`` (name -> ModelProto) at batch 1 and 32 of
    the task's validation rows, the graphs timed interleaved in rounds (measure.latency)."""
    from ..measure.latency import interleaved
    from ..measure.runners import OrtRunner

    big = ctx.task.example_inputs(32, "val")
    cases = {}
    for name, model in models.items():
        path = ctx.path(f"{name}.onnx")
        onnx.save(model, str(path))
        runner = OrtRunner(path, ctx.task.input_names)
        for b in (1, 32):
            cases[(name, str(b))] = (runner, ctx.task.collate(tuple(t[:b] for t in big)), b)
    timed = interleaved(cases, rounds=10, warmup=2, calls_per_block=3, progress=False)
    return {name: {b: round(timed[(name, b)].summary()["p50"], 3) for b in ("1", "32")} for name in models}


@register("ort_transformer_optimize", OrtTransformerOptimizeConfig, accepts=(ONNX,),
          summary="fuse attention, LayerNorm, GELU, embeddings of a BERT-family graph (ONNX Runtime)")
def ort_transformer_optimize(state: ModelState, cfg: OrtTransformerOptimizeConfig, ctx: StageContext) -> StageReport:
    report = StageReport("ort_transformer_optimize", cfg.model_dump())
    src = Path(state.require_onnx())
    if is_quantized(src):
        raise ModelError("ort_transformer_optimize: the graph is already quantized; the optimizer fuses float graphs.",
                         "Put ort_transformer_optimize before ort_int8_dynamic.")
    heads, hidden, where = _sizes(state, cfg)
    graph = src
    if cfg.eager_attention and state.torch_model is not None and (eager := _eager_reexport(state, src, ctx)):
        graph = eager
        report.stats["reexported"] = "with eager attention (the SDPA export has no attention pattern it fuses)"
    logging.getLogger("onnxruntime.transformers").setLevel(logging.ERROR)
    if cfg.skip_layer_norm == "auto":
        model, fused, report.stats["shape_inference"] = _optimize(graph, heads, hidden, cfg, True)
        alt = _optimize(graph, heads, hidden, cfg, False)
        timed = _time({"fused": model, "unfused": alt[0]}, ctx)
        gain = sum(timed["fused"][b] / timed["unfused"][b] for b in timed["fused"]) / len(timed["fused"])
        report.stats["skip_layer_norm_p50_ms"] = timed
        if gain > 1.03:  # the unfused graph is faster by more than the timing noise
            model, fused, report.stats["shape_inference"] = alt
        report.notes.append(f"skip_layer_norm auto: {'unfused' if gain > 1.03 else 'fused'} kept (the unfused graph "
                            f"ran {gain:.2f}x as fast on average at batch sizes {', '.join(timed['fused'])})")
    else:
        model, fused, report.stats["shape_inference"] = _optimize(graph, heads, hidden, cfg, cfg.skip_layer_norm)
    out = ctx.path("fused.onnx")
    onnx.save(model, str(out))
    report.changed["<graph>"] = "fused: " + ", ".join(f"{op} x{n}" for op, n in fused.items())
    if not fused.get("Attention") and not fused.get("MultiHeadAttention"):
        report.skipped["<attention>"] = "no Attention fusion happened: attention runs as separate MatMul/Softmax ops"
        report.notes.append("no Attention fusion happened")
    if not fused.get("EmbedLayerNormalization") and state.spec.get("vocab_pruning"):
        report.skipped["<embeddings>"] = (
            "no EmbedLayerNormalization fusion: the vocabulary-pruned word embeddings are two lookups "
            "(id map, then compact table), which the optimizer does not match; the embedding lookups, "
            "their sum and LayerNorm run as separate ops")
    report.stats.update(fused_operators=fused, num_heads=heads, hidden_size=hidden, sizes_from=where,
                        optimized_for="CPUExecutionProvider", nodes_before=sum(op_counts(src).values()),
                        nodes_after=len(model.graph.node))
    report.stats.update(check_parity("ort_transformer_optimize", state, src, out, ctx, cfg))
    state.onnx_path = out
    return report
