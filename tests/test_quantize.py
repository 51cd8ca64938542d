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


def test_nodes_already_reading_integer_tables_are_not_counted_as_quantized():
    import onnx
    from onnx import TensorProto, helper

    from slimcart.quantize.ort import _quantized_nodes

    table = helper.make_tensor("codes", TensorProto.UINT8, [4, 2], [1, 2, 3, 4, 5, 6, 7, 8])
    fp = helper.make_tensor("w", TensorProto.FLOAT, [2, 2], [1.0, 0.0, 0.0, 1.0])
    nodes = [helper.make_node("Gather", ["codes", "ids"], ["g"], name="lookup"),
             helper.make_node("Cast", ["g"], ["gf"], to=TensorProto.FLOAT, name="cast"),
             helper.make_node("MatMul", ["gf", "w"], ["y"], name="proj")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, [3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 2])], [table, fp])
    assert _quantized_nodes(graph) == {"lookup"}     # it reads an integer table from the start
    quantized = helper.make_node("MatMulInteger", ["gq", "wq"], ["yq"], name="proj_quant")
    after = helper.make_graph(nodes[:2] + [quantized], "g", graph.input, graph.output, [table, fp])
    assert _quantized_nodes(after) - _quantized_nodes(graph) == {"proj"}
    onnx.checker.check_graph(graph)
