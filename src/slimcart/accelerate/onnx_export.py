"""Export a float PyTorch model to ONNX, then check ONNX Runtime against eager on real inputs."""
from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import torch

from ..errors import ModelError
from ..registry import ONNX, TORCH, TechniqueConfig, register
from ..stage import ModelState, StageContext, StageReport


class OnnxExportConfig(TechniqueConfig):
    opset: int = 17
    max_abs_error: float = 1e-3     # parity bounds against eager; exceeding one fails the stage
    max_rel_error: float = 1e-3     # relative to the largest eager output magnitude
    parity_batch: int = 64

    def model_post_init(self, _ctx) -> None:
        if not 13 <= self.opset <= 21:
            raise ValueError("opset must be between 13 and 21")


def export_onnx(model: torch.nn.Module, example: tuple[torch.Tensor, ...], path: Path,
                input_names: tuple[str, ...], dynamic_axes: dict, opset: int = 17) -> Path:
    """torch.onnx.export with the TorchScript exporter (one self-contained file); TF "same" padding
    is exported with the constant amounts of ``example``'s height and width (``static_pad.py``)."""
    from .static_pad import static_same_padding

    spatial = any(i >= 2 for ax in dynamic_axes.values() for i in ax)  # a dynamic height/width: keep it general
    model = model.eval()
    exported = model if spatial else static_same_padding(model, example)
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(exported, example, str(path), input_names=list(input_names),
                              output_names=["logits"], dynamic_axes=dynamic_axes,
                              opset_version=opset, dynamo=False)
        except Exception as exc:  # the exporter raises many types for unsupported modules
            raise ModelError(f"ONNX export failed: {type(exc).__name__}: {str(exc)[:400]}",
                             "Quantized eager layers (int8_dynamic) cannot be exported: put "
                             "onnx_export before them and use ort_int8_dynamic.") from None
    if exported is not model:
        _fuse_pads(path)
    return path


def _fuse_pads(path: Path) -> None:
    import onnx

    from .static_pad import fuse_zero_pads

    proto = onnx.load(str(path))
    if fuse_zero_pads(proto):
        onnx.save(proto, str(path))


def parity(model: torch.nn.Module, onnx_path: Path, inputs: tuple[torch.Tensor, ...],
           input_names: tuple[str, ...]) -> dict[str, float]:
    from .. measure.runtimes import OrtRunner

    with torch.inference_mode():
        ref = model(*inputs).float().numpy()
    got = OrtRunner(onnx_path, input_names)(inputs)
    err = float(np.abs(ref - got).max())
    return {"max_abs_error": err, "max_rel_error": err / max(float(np.abs(ref).max()), 1e-12),
            "parity_rows": int(ref.shape[0])}


@register("onnx_export", OnnxExportConfig, accepts=(TORCH,), produces=ONNX,
          summary="export to ONNX (served by ONNX Runtime), with a parity check against eager")
def onnx_export(state: ModelState, cfg: OnnxExportConfig, ctx: StageContext) -> StageReport:
    report = StageReport("onnx_export", cfg.model_dump())
    task = ctx.task
    path = export_onnx(state.torch_model, task.example_inputs(2, "val"), ctx.path("model.onnx"),
                       task.input_names, task.dynamic_axes(), cfg.opset)
    stats = parity(state.torch_model, path, task.example_inputs(cfg.parity_batch, "val"), task.input_names)
    report.stats = stats
    if stats["max_abs_error"] > cfg.max_abs_error and stats["max_rel_error"] > cfg.max_rel_error:
        raise ModelError(f"onnx_export: ONNX Runtime disagrees with eager: max abs error "
                         f"{stats['max_abs_error']:.3g}, relative {stats['max_rel_error']:.3g} "
                         f"(bounds {cfg.max_abs_error}, {cfg.max_rel_error}).",
                         "Raise max_abs_error / max_rel_error in the stage if this is expected.")
    report.changed["<graph>"] = f"exported with opset {cfg.opset}"
    state.format, state.onnx_path = ONNX, path
    return report
