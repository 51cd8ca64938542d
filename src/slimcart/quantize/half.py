"""Half precision: float16 or bfloat16 weights, half the bytes of float32.

PyTorch: every module's weights are cast except normalisation layers (and ``exclude``), which
stay float32 and cast their input up and their output back down; the model's inputs and outputs
stay float32, so the task code is unchanged. The spec record ``{"dtype", "keep_fp32"}`` casts
the rebuilt architecture before a saved state dict is loaded, so the dtypes survive a reload.
ONNX: ONNX Runtime's ``convert_float_to_float16`` (float16 only; inputs and outputs kept
float32; normalisation ops and ``exclude`` nodes kept float32).

Half arithmetic pays off on GPUs at large batches and on CPUs with native support: measured on
an H200 host (Xeon, AMX-BF16), MiniLM at batch 32 ran 1.9x faster in bf16 than in float32 with
PyTorch, and on the H200 2.0x (bf16) / 2.5x (fp16) at batch 256 (small batches and the small CNN
are bound by kernel launches there). Elsewhere it is a storage format: the stage still works and
the model is 2x smaller, but PyTorch emulates the arithmetic (13-15x slower than float32 measured
on an AVX2 CPU) and a note says so, with this CPU's features.
"""
from __future__ import annotations

import fnmatch
import functools
import os
from typing import Any, Literal

import torch
from torch import nn

from ..errors import ModelError, UsageError
from ..measure import hardware
from ..registry import ONNX, TORCH, TechniqueConfig, register
from ..stage import ModelState, StageContext, StageReport
from .sensitivity import sqnr_db

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
NORMS = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm,
         nn.LocalResponseNorm) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())
NORM_OPS = ["LayerNormalization", "SkipLayerNormalization", "SimplifiedLayerNormalization",
            "SkipSimplifiedLayerNormalization", "BatchNormalization", "InstanceNormalization",
            "GroupNormalization", "EmbedLayerNormalization", "Softmax"]


class HalfConfig(TechniqueConfig):
    dtype: Literal["float16", "bfloat16"] = "bfloat16"
    keep_norm_fp32: bool = True   # normalisation layers (and, in ONNX, Softmax) stay float32
    exclude: list[str] = []       # module-name (PyTorch) or node-name (ONNX) patterns kept float32


# ---- PyTorch ------------------------------------------------------------------------------------

def _cast(value: Any, dtype: torch.dtype) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, (tuple, list)):
        return type(value)(_cast(v, dtype) for v in value)
    return value


def _dtype(ref: torch.Tensor | None, default: torch.dtype) -> torch.dtype:
    return ref.dtype if ref is not None else default


def _inputs_to(_mod, args, kwargs, ref, default):
    d = _dtype(ref, default)
    return _cast(args, d), {k: _cast(v, d) for k, v in kwargs.items()}


def _output_to(_mod, _args, output, ref, default):
    return _cast(output, _dtype(ref, default))


def _model_inputs(mod, args, kwargs, ref, default):
    if _dtype(ref, default) == torch.bfloat16 and torch.onnx.is_in_onnx_export():
        raise ModelError("a bfloat16 model cannot be exported for ONNX Runtime: ONNX's Conv/Gemm/MatMul/"
                         "LayerNormalization have no bfloat16 kernels there.",
                         "Measure it with runtime torch only, or use half with dtype float16.")
    return _inputs_to(mod, args, kwargs, ref, default)


def _first_float(mod: nn.Module) -> torch.Tensor | None:
    return next((p for p in mod.parameters() if p.is_floating_point()), None)


def apply_half(model: nn.Module, record: dict[str, Any]) -> nn.Module:
    """Cast ``model`` in place as ``record`` says: floating weights and buffers to ``dtype`` except
    in the ``keep_fp32`` modules (and below them). The casts at the boundaries follow the weights'
    dtypes at call time (a reference weight of each side), so moving or re-casting the whole model
    later (``model.to(device, dtype)``) keeps it consistent."""
    if record.get("dtype") not in DTYPES:
        raise ModelError(f"half record has an unknown dtype {record.get('dtype')!r}; expected one of "
                         f"{', '.join(DTYPES)}.", "The model folder's slimcart.json is damaged.")
    dtype, keep = DTYPES[record["dtype"]], list(record.get("keep_fp32", []))
    names = dict(model.named_modules())
    missing = [k for k in keep if k not in names]
    if missing:
        raise ModelError(f"half record keeps {missing[:3]} in float32, but this architecture has no such "
                         "module.", "The model folder's slimcart.json does not match its weights.")
    ref = None  # a weight that is cast: its dtype is the model's compute dtype
    for name, mod in names.items():
        if any(name == k or name.startswith(k + ".") for k in keep if k):
            continue
        for p in mod.parameters(recurse=False):
            if p.is_floating_point():
                p.data = p.data.to(dtype)
                ref = p if ref is None else ref
        for key, b in mod.named_buffers(recurse=False):
            if b.is_floating_point():
                mod._buffers[key] = b.to(dtype)
    for k in keep:
        kept = names[k]
        kept.register_forward_pre_hook(functools.partial(_inputs_to, ref=_first_float(kept), default=torch.float32),
                                       with_kwargs=True)
        kept.register_forward_hook(functools.partial(_output_to, ref=ref, default=dtype))
    model.register_forward_pre_hook(functools.partial(_model_inputs, ref=ref, default=dtype), with_kwargs=True)
    model.register_forward_hook(functools.partial(_output_to, ref=None, default=torch.float32))
    return model


def _kept(model: nn.Module, cfg: HalfConfig) -> dict[str, str]:
    """Top-most modules kept float32 -> why."""
    out: dict[str, str] = {}
    for name, mod in model.named_modules():
        if not name or any(name.startswith(k + ".") for k in out):
            continue
        if any(fnmatch.fnmatchcase(name, p) for p in cfg.exclude):
            out[name] = "kept float32: excluded by pattern"
        elif cfg.keep_norm_fp32 and isinstance(mod, NORMS):
            out[name] = (f"kept float32: {type(mod).__name__} (its statistics and eps need float32 "
                         "range and precision); input cast up, output cast back")
    return out


def cpu_note(dtype: str, how: str | None = None) -> str | None:
    """Why this CPU gains nothing from ``dtype``, or None when it has native support."""
    feats = hardware.BF16_FEATURES if dtype == "bfloat16" else hardware.FP16_FEATURES
    have = ", ".join(hardware.cpu()["features"]) or "none of the listed ones"
    if dtype == "float16" and hardware.has_cpu_feature("avx512_fp16") \
            and not hardware.has_cpu_feature("amx_fp16", "fphp"):
        # measured on a Xeon with AVX512-FP16 and AMX-BF16, no AMX-FP16 (PyTorch 2.11, 16 threads)
        return (f"float16 on this CPU ({have}): it has AVX512-FP16 but no AMX-FP16, and there PyTorch ran "
                "float16 no faster than float32 (MiniLM batch 32: 56 vs 51 ms) while bfloat16 on AMX-BF16 was "
                "1.9x faster: prefer bfloat16 on such a CPU")
    if hardware.has_cpu_feature(*feats):
        return None
    how = how or (f"PyTorch emulates {dtype} arithmetic and the model runs slower than float32 "
                  "(13-15x measured on an AVX2 CPU)")
    return (f"{dtype} is a storage format on this CPU: it reports none of {', '.join(feats)} (its features: "
            f"{have}), so {how}. It is 2x smaller on disk; for speed serve it on a GPU or a CPU with "
            "native support")


def _torch_half(state: ModelState, cfg: HalfConfig, ctx: StageContext, report: StageReport) -> None:
    if state.spec.get("half"):
        raise UsageError("half: the model is already cast to a half type.")
    model = state.torch_model.eval()
    names = [n for n, _ in model.named_modules()]
    for pat in cfg.exclude:
        if not any(fnmatch.fnmatchcase(n, pat) for n in names):
            raise UsageError(f"half.exclude: pattern {pat!r} matches no layer of the model.",
                             "List layer names with `slimcart inspect MODEL_DIR`.")
    kept = _kept(model, cfg)
    example = ctx.task.example_inputs(16, "val") if ctx.task is not None else None
    with torch.inference_mode():
        ref = model(*example).float() if example is not None else None
    before = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    record = {"dtype": cfg.dtype, "keep_fp32": list(kept)}
    apply_half(model, record)
    after = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    for name, mod in model.named_modules():
        own = [k for k, p in mod.named_parameters(recurse=False) if p.dtype == DTYPES[cfg.dtype]]
        if name in kept:
            report.skipped[name] = kept[name]
        elif own:
            report.changed[name] = f"{type(mod).__name__} {', '.join(own)} -> {cfg.dtype}"
    state.spec = {**state.spec, "half": record}
    report.stats.update({"dtype": cfg.dtype, "kept_fp32": len(kept), "cast_modules": len(report.changed),
                         "state_bytes_before": before, "state_bytes_after": after})
    if ref is not None:
        with torch.inference_mode():
            out = model(*example).float()
        report.stats.update({"output_sqnr_db": round(sqnr_db(ref, out), 2),
                             "max_abs_error": float((out - ref).abs().max())})
    note = cpu_note(cfg.dtype)
    if note:
        report.notes.append(note)
    if cfg.dtype == "bfloat16":
        report.notes.append("ONNX Runtime has no bfloat16 kernels for Conv/Gemm/MatMul: measure this "
                            "variant with runtime torch (or use dtype float16 for ONNX Runtime on a GPU)")


# ---- ONNX ---------------------------------------------------------------------------------------

def _onnx_half(state: ModelState, cfg: HalfConfig, ctx: StageContext, report: StageReport) -> None:
    import onnx
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    if cfg.dtype != "float16":
        raise UsageError("half: an ONNX model is converted to float16 only (ONNX Runtime's converter writes "
                         "float16, and its providers lack bfloat16 kernels for Conv/Gemm/MatMul).",
                         "Set dtype: float16, or apply half with bfloat16 before onnx_export and serve "
                         "the PyTorch model.")
    src = state.require_onnx()
    model = onnx.load(str(src))
    nodes = [n.name for n in model.graph.node]
    for pat in cfg.exclude:
        if not any(fnmatch.fnmatchcase(n, pat) for n in nodes):
            raise UsageError(f"half.exclude: pattern {pat!r} matches no node of the graph.",
                             "Node names are listed in the variant's onnx_export stage or by Netron.")
    blocked = [n for n in nodes if any(fnmatch.fnmatchcase(n, p) for p in cfg.exclude)]
    ops = list(DEFAULT_OP_BLOCK_LIST) + (NORM_OPS if cfg.keep_norm_fp32 else [])
    try:
        half = convert_float_to_float16(model, keep_io_types=True, op_block_list=ops, node_block_list=blocked)
    except Exception as exc:  # the converter raises plain errors on graphs it cannot handle
        raise ModelError(f"half: ONNX Runtime's float16 converter failed on {src.name}: "
                         f"{type(exc).__name__}: {str(exc)[:300]}", "Convert a float graph (before int8 stages).") from None
    out = ctx.path("float16.onnx")
    onnx.save(half, str(out))
    for n in model.graph.node:
        if n.name in blocked:
            report.skipped[n.name] = "kept float32: excluded by pattern"
        elif n.op_type in ops:
            report.skipped[n.name] = f"kept float32: {n.op_type} is on the float32 block list"
    report.changed["<graph>"] = "float initializers and the other ops -> float16 (inputs/outputs stay float32)"
    report.stats.update({"dtype": "float16", "kept_fp32_nodes": len(report.skipped),
                         "file_bytes_before": os.path.getsize(src), "file_bytes_after": os.path.getsize(out)})
    if ctx.task is not None:
        import numpy as np

        from ..measure.runtimes import OrtRunner

        x = ctx.task.example_inputs(16, "val")
        ref = OrtRunner(src, ctx.task.input_names)(x)
        got = OrtRunner(out, ctx.task.input_names)(x)
        report.stats.update({"output_sqnr_db": round(sqnr_db(torch.from_numpy(ref), torch.from_numpy(got)), 2),
                             "max_abs_error": float(np.abs(ref - got).max())})
    feats = ", ".join(hardware.cpu()["features"]) or "none listed"
    report.notes.append("float16 graph: 2x smaller; ONNX Runtime's CPU provider runs the float16 ops it has no "
                        "kernel for through casts to float32 (0.9-1.0x the float32 speed measured on an AVX2 "
                        f"CPU; this CPU: {feats}); the speed gain is on CUDA")
    state.onnx_path = out


@register("half", HalfConfig, accepts=(TORCH, ONNX),
          summary="float16/bfloat16 weights (2x smaller); fast on GPUs and CPUs with native half support")
def half(state: ModelState, cfg: HalfConfig, ctx: StageContext) -> StageReport:
    report = StageReport("half", cfg.model_dump())
    if state.format == ONNX:
        _onnx_half(state, cfg, ctx, report)
    else:
        _torch_half(state, cfg, ctx, report)
    return report
