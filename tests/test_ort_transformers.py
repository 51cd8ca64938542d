"""ort_transformer_optimize's skip_layer_norm switch: the residual adds left unfused, the graph tagged
so that every ONNX Runtime session slimcart opens keeps SkipLayerNormFusion off (through int8 too),
and the timed choice of ``auto``."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import onnx
import pytest
import torch

from slimcart.accelerate.onnx_export import OnnxExportConfig, onnx_export
from slimcart.accelerate.ort_transformers import OrtTransformerOptimizeConfig, ort_transformer_optimize
from slimcart.measure.runners import DISABLED_OPTIMIZERS_KEY, OrtRunner
from slimcart.quantize.ort import OrtInt8DynamicConfig, ort_int8_dynamic
from slimcart.stage import ModelState, StageContext
from slimcart.tasks.base import Split
from slimcart.tasks.intent import IntentTask
from tests.tiny import TINY, tiny

NAMES = ("input_ids", "attention_mask")


def _split(rows: int, seed: int) -> Split:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 100, (rows, 10), generator=g)
    ids[:, 0], ids[:, -1] = 2, 3
    return Split((ids, torch.ones_like(ids)), torch.randint(0, 3, (rows,), generator=g))


@pytest.fixture(scope="module")
def task():
    tok = SimpleNamespace(all_special_ids=[0, 1, 2, 3, 4], unk_token_id=1)
    return IntentTask(dataset="tiny", splits={"train": _split(24, 0), "val": _split(40, 1), "test": _split(8, 2)},
                      info={"classes": ["a", "b", "c"], "num_classes": 3}, tokenizer=tok)


def exported(task, tmp_path):
    state = ModelState.from_module(tiny("text").eval(), dict(TINY["text"]))
    onnx_export(state, OnnxExportConfig(), StageContext(task, tmp_path, stage_index=0, progress=False))
    return state


def ops(path) -> set[str]:
    return {n.op_type for n in onnx.load(str(path)).graph.node}


def meta(path) -> dict:
    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}


def test_unfused_residual_adds_stay_unfused_in_every_session(task, tmp_path):
    state = exported(task, tmp_path)
    eager = state.torch_model
    ctx = StageContext(task, tmp_path, stage_index=1, progress=False)
    fused = ModelState(state.format, state.spec, state.torch_model, state.onnx_path)
    ort_transformer_optimize(fused, OrtTransformerOptimizeConfig(), ctx)
    assert "SkipLayerNormalization" in ops(fused.onnx_path) and DISABLED_OPTIMIZERS_KEY not in meta(fused.onnx_path)
    ctx.stage_index = 2
    rep = ort_transformer_optimize(state, OrtTransformerOptimizeConfig(skip_layer_norm=False), ctx)
    assert "SkipLayerNormalization" not in ops(state.onnx_path) and "LayerNormalization" in ops(state.onnx_path)
    assert "Attention" in rep.stats["fused_operators"]
    assert meta(state.onnx_path)[DISABLED_OPTIMIZERS_KEY] == "SkipLayerNormFusion"
    runner = OrtRunner(state.onnx_path, NAMES)
    assert runner.disabled_optimizers == ["SkipLayerNormFusion"] and OrtRunner(fused.onnx_path, NAMES).disabled_optimizers == []
    x = task.example_inputs(8, "test")
    with torch.no_grad():
        ref = eager(*x).numpy()
    assert np.abs(runner(x) - ref).max() < 1e-4
    ctx.stage_index = 3
    ort_int8_dynamic(state, OrtInt8DynamicConfig(op_types=["MatMul", "Attention"]), ctx)
    assert meta(state.onnx_path)[DISABLED_OPTIMIZERS_KEY] == "SkipLayerNormFusion"  # int8 keeps the tag
    assert OrtRunner(state.onnx_path, NAMES).disabled_optimizers == ["SkipLayerNormFusion"]


def test_auto_times_both_graphs_and_keeps_one(task, tmp_path):
    state = exported(task, tmp_path)
    rep = ort_transformer_optimize(state, OrtTransformerOptimizeConfig(skip_layer_norm="auto"),
                                   StageContext(task, tmp_path, stage_index=1, progress=False))
    timed = rep.stats["skip_layer_norm_p50_ms"]
    assert set(timed) == {"fused", "unfused"} and set(timed["fused"]) == {"1", "32"}
    assert all(v > 0 for t in timed.values() for v in t.values())
    kept_unfused = "SkipLayerNormalization" not in ops(state.onnx_path)
    assert kept_unfused == (DISABLED_OPTIMIZERS_KEY in meta(state.onnx_path))
    assert any(n.startswith("skip_layer_norm auto: " + ("unfused" if kept_unfused else "fused")) for n in rep.notes)
