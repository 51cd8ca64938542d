"""Weight-only quantization: 8- or 4-bit weights with one scale per group of input columns,
activations left in float.

``weight_only`` (PyTorch): each Linear becomes a ``WeightOnlyLinear`` holding packed codes and
group scales; the saved file shrinks about 4x (int8) or 7.5x (int4) for those layers. The
weights are dequantized at every forward: PyTorch's own weight-only kernels
(``aten._weight_int8pack_mm``, ``aten._weight_int4pack_mm_for_cpu``) measured 40-100x slower
than a float matmul on an AVX2 CPU (see benchmarks/weight_only.py), so they are not used. The
module exports to ONNX, but the exporter folds the dequantization of the constant codes into
float weights: an ONNX artifact converted from it is float-sized (use ``ort_weight_only``).
``ort_weight_only`` (ONNX): ONNX Runtime's ``MatMulNBitsQuantizer``: MatMul -> MatMulNBits
(2/4/8 bits, blocks along K) and, optionally, embedding Gather -> GatherBlockQuantized (4 bits).
"""
from __future__ import annotations

import fnmatch
import logging
import os
from typing import Literal

import onnx
import torch
from pydantic import Field
from torch import nn

from ..errors import ModelError, UsageError
from ..models.weight_only_linear import WeightOnlyLinear, replace_linear
from ..registry import ONNX, TORCH, TechniqueConfig, register
from ..stage import ModelState, StageContext, StageReport
from .sensitivity import sqnr_db


def _check_patterns(key: str, patterns: list[str], names: list[str], what: str) -> None:
    for pat in patterns:
        if not any(fnmatch.fnmatchcase(n, pat) for n in names):
            raise UsageError(f"{key}: pattern {pat!r} matches no {what} of the model.",
                             "List layer names with `slimcart inspect MODEL_DIR`.")


# ---- PyTorch ----------------------------------------------------------------------------------

class WeightOnlyConfig(TechniqueConfig):
    bits: Literal[4, 8] = 8
    group_size: int = Field(default=128, ge=2, le=65536)  # input columns sharing one scale
    symmetric: bool = True
    exclude: list[str] = []                                # module-name patterns (fnmatch) kept float

    def model_post_init(self, _ctx) -> None:
        if self.group_size % 2:
            raise ValueError(f"group_size must be even (two 4-bit codes share a byte), got {self.group_size}")


@register("weight_only", WeightOnlyConfig, accepts=(TORCH,),
          summary="weight-only INT8/INT4 Linear weights with group-wise scales (PyTorch), dequantized at run time")
def weight_only(state: ModelState, cfg: WeightOnlyConfig, ctx: StageContext) -> StageReport:
    report = StageReport("weight_only", cfg.model_dump())
    if state.spec.get("half"):
        raise UsageError("weight_only: the model was already cast to a half type by a `half` stage.",
                         "Put weight_only before half in the recipe.")
    if state.spec.get("weight_only"):
        raise UsageError("weight_only: the model's Linear layers are already weight-only quantized.")
    model = state.torch_model
    _check_patterns("weight_only.exclude", cfg.exclude, [n for n, _ in model.named_modules()], "layer")
    example = ctx.task.example_inputs(16, "val") if ctx.task is not None else None
    with torch.inference_mode():
        ref = model(*example).float() if example is not None else None
    layers, before, after, sqnrs = [], 0, 0, []
    for name, mod in list(model.named_modules()):
        if isinstance(mod, nn.Linear) and type(mod) is not nn.Linear:
            report.skipped[name] = (f"{type(mod).__name__}: a Linear subclass whose owner may read its "
                                    ".weight directly; left in float")
        elif isinstance(mod, nn.Linear):
            if any(fnmatch.fnmatchcase(name, p) for p in cfg.exclude):
                report.skipped[name] = "excluded by pattern"
                continue
            new = WeightOnlyLinear.from_linear(mod, cfg.bits, cfg.group_size, cfg.symmetric)
            db = sqnr_db(mod.weight.detach().float(), new.dequantize())
            b0 = sum(p.numel() * p.element_size() for p in mod.parameters())
            before, after = before + b0, after + new.stored_bytes()
            replace_linear(model, name, new.to(mod.weight.device))
            layers.append(name)
            sqnrs.append(db)
            report.changed[name] = (f"Linear {mod.in_features}x{mod.out_features} -> int{cfg.bits} weights, "
                                    f"groups of {cfg.group_size} (weight SQNR {db:.1f} dB, {b0:,} -> "
                                    f"{new.stored_bytes():,} bytes)")
        elif isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding, nn.EmbeddingBag)):
            report.skipped[name] = f"{type(mod).__name__}: weight_only covers Linear layers only"
    if not layers:
        raise UsageError("weight_only: the model has no Linear layer to quantize (after exclude).")
    state.spec = {**state.spec, "weight_only": {"bits": cfg.bits, "group_size": cfg.group_size,
                                                "symmetric": cfg.symmetric, "layers": layers}}
    report.stats = {"bits": cfg.bits, "group_size": cfg.group_size, "symmetric": cfg.symmetric,
                    "quantized_layers": len(layers), "linear_bytes_before": before, "linear_bytes_after": after,
                    "weight_sqnr_db_min": round(min(sqnrs), 2),
                    "weight_sqnr_db_mean": round(sum(sqnrs) / len(sqnrs), 2)}
    if ref is not None:
        with torch.inference_mode():
            out = model(*example).float()
        report.stats["output_sqnr_db"] = round(sqnr_db(ref, out), 2)
        report.stats["max_abs_error"] = float((out - ref).abs().max())
    report.notes.append(f"weight-only int{cfg.bits}: the quantized Linear weights take {after / max(before, 1):.0%} "
                        "of their float bytes; every forward dequantizes them, so on a CPU it runs no faster "
                        "than float (it saves disk and download, not compute). Converted for ONNX Runtime it "
                        "holds float weights again (the exporter folds the dequantization): for a small ONNX "
                        "graph use onnx_export + ort_weight_only")
    return report


# ---- ONNX Runtime: MatMulNBits ----------------------------------------------------------------

class OrtWeightOnlyConfig(TechniqueConfig):
    bits: Literal[2, 4, 8] = 4
    block_size: int = 128                  # weights along K sharing one scale: a power of 2, >= 16
    symmetric: bool = True
    accuracy_level: Literal[0, 1, 2, 3, 4] = 0  # 0: float compute; 4: int8 compute (activations quantized per block)
    op_types: list[Literal["MatMul", "Gather"]] = ["MatMul"]
    exclude: list[str] = []                # node-name patterns (fnmatch) left in float

    def model_post_init(self, _ctx) -> None:
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of 2 of at least 16, got {self.block_size}")
        if "Gather" in self.op_types and self.bits != 4:
            raise ValueError("Gather (embedding tables) is quantized with 4 bits only by ONNX Runtime; "
                             "set bits: 4 or drop Gather from op_types")
        if not self.op_types:
            raise ValueError("op_types must name MatMul and/or Gather")


def _candidates(graph: onnx.GraphProto, op_types: list[str]) -> dict[str, tuple[str, onnx.TensorProto | None]]:
    """Nodes of ``op_types`` -> (op, the constant weight it reads, or None). Gathers over
    activations (shape arithmetic) are not candidates."""
    inits = {t.name: t for t in graph.initializer}
    out = {}
    for n in graph.node:
        if n.op_type == "MatMul" and "MatMul" in op_types:
            out[n.name] = (n.op_type, inits.get(n.input[1]))
        elif n.op_type == "Gather" and "Gather" in op_types and n.input[0] in inits:
            out[n.name] = (n.op_type, inits[n.input[0]])
    return out


def _tensor_bytes(t: onnx.TensorProto) -> int:
    return len(t.raw_data) if t.raw_data else onnx.numpy_helper.to_array(t).nbytes


@register("ort_weight_only", OrtWeightOnlyConfig, accepts=(ONNX,),
          summary="weight-only 2/4/8-bit MatMul (and 4-bit embedding) weights with ONNX Runtime's MatMulNBits")
def ort_weight_only(state: ModelState, cfg: OrtWeightOnlyConfig, ctx: StageContext) -> StageReport:
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    from ..measure import hardware

    report = StageReport("ort_weight_only", cfg.model_dump())
    src = state.require_onnx()
    model = onnx.load(str(src))
    cands = _candidates(model.graph, cfg.op_types)
    _check_patterns("ort_weight_only.exclude", cfg.exclude, list(cands), f"{'/'.join(cfg.op_types)} node")
    excluded = [n for n in cands if any(fnmatch.fnmatchcase(n, p) for p in cfg.exclude)]
    for name in ("onnxruntime.quantization.matmul_nbits_quantizer", "onnxruntime.quantization"):
        logging.getLogger(name).setLevel(logging.ERROR)  # it logs every node it looks at
    try:
        q = MatMulNBitsQuantizer(model, bits=cfg.bits, block_size=cfg.block_size, is_symmetric=cfg.symmetric,
                                 accuracy_level=cfg.accuracy_level, nodes_to_exclude=excluded,
                                 op_types_to_quantize=tuple(cfg.op_types))
        q.process()
    except Exception as exc:  # the quantizer raises bare exceptions on graphs it cannot handle
        raise ModelError(f"ONNX Runtime's MatMulNBits quantizer failed on {src.name}: {exc}") from None
    out = ctx.path(f"int{cfg.bits}-weights.onnx")
    q.model.save_model_to_file(str(out), use_external_data_format=False)
    graph = q.model.model.graph
    new_ops = {n.name: n.op_type for n in graph.node}
    new_inits = {t.name: t for t in graph.initializer}
    before = after = 0
    for name, (op, weight) in cands.items():
        qname = f"{name}_Q{cfg.bits}"
        if name in excluded:
            report.skipped[name] = "excluded by pattern"
        elif weight is None:
            report.skipped[name] = f"{op}: both inputs are activations (no constant weight)"
        elif qname not in new_ops:
            report.skipped[name] = f"{op}: left in float by the quantizer (weight shape {list(weight.dims)})"
        else:
            b0 = _tensor_bytes(weight)
            b1 = sum(_tensor_bytes(new_inits[i]) for n in graph.node if n.name == qname
                     for i in n.input if i in new_inits)
            before, after = before + b0, after + b1
            report.changed[name] = (f"{op} {list(weight.dims)} -> {new_ops[qname]} int{cfg.bits}, blocks of "
                                    f"{cfg.block_size} ({b0:,} -> {b1:,} bytes)")
    for n in model.graph.node:
        if n.op_type == "Gemm":
            report.skipped[n.name] = ("Gemm: MatMulNBits replaces MatMul only (a Linear on 2-D input is "
                                      "exported as Gemm); left in float")
    if not before:
        raise ModelError(f"ort_weight_only: no {'/'.join(cfg.op_types)} node with a constant weight was "
                         f"quantized in {src.name}.", "Check op_types and exclude.")
    report.stats = {"bits": cfg.bits, "block_size": cfg.block_size, "symmetric": cfg.symmetric,
                    "accuracy_level": cfg.accuracy_level, "quantized_nodes": len(report.changed),
                    "weight_bytes_before": before, "weight_bytes_after": after,
                    "file_bytes_before": os.path.getsize(src), "file_bytes_after": os.path.getsize(out)}
    if cfg.accuracy_level == 4 and not hardware.has_cpu_feature("avx512_vnni", "avx_vnni", "amx_tile"):
        feats = ", ".join(hardware.cpu()["features"]) or "none listed"
        report.notes.append("accuracy_level 4 multiplies in int8, but this CPU has no VNNI/AMX int8 dot "
                            f"products (features: {feats}); compare its latency with accuracy_level 0 and "
                            "ort_int8_dynamic before choosing it")
    state.onnx_path = out
    return report
