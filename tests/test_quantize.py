"""ONNX Runtime dynamic INT8: every quantized node is reported, the graph shrinks, outputs stay close."""
import os

import numpy as np
import torch

from slimcart.accelerate.onnx_export import export_onnx
from slimcart.measure.runtimes import OrtRunner
from slimcart.quantize.ort import OrtInt8DynamicConfig, ort_int8_dynamic
from slimcart.stage import ModelState, StageContext
from tests.tiny import tiny, tiny_inputs

NAMES = ("input_ids", "attention_mask")


def test_text_model_tables_and_matmuls_are_quantized(tmp_path):
    model = tiny("text")
    # a realistically sized vocabulary so that the tables dominate, as in MiniLM
    model.encoder.embeddings.word_embeddings = torch.nn.Embedding(3000, 32)
    path = export_onnx(model, tiny_inputs("text", 2), tmp_path / "m.onnx", NAMES,
                       {n: {0: "b", 1: "s"} for n in NAMES} | {"logits": {0: "b"}})
    state = ModelState("onnx", {}, onnx_path=path)
    rep = ort_int8_dynamic(state, OrtInt8DynamicConfig(op_types=["MatMul", "Gemm", "Gather"]),
                           StageContext(None, tmp_path))
    changed = set(rep.changed)
    assert "/encoder/embeddings/word_embeddings/Gather" in changed
    assert sum("MatMul" in n for n in changed) >= 12  # q, k, v, out, ffn in, ffn out x 2 layers
    assert all("no constant weight input" in r for r in rep.skipped.values())
    assert os.path.getsize(state.onnx_path) < 0.4 * os.path.getsize(path)
    x = tiny_inputs("text", 5)
    with torch.inference_mode():
        ref = model(*x).numpy()
    got = OrtRunner(state.onnx_path, NAMES)(x)
    assert np.abs(got - ref).max() < 0.05 * np.abs(ref).max() + 1e-3
    assert "preprocess" in rep.stats
