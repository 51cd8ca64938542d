"""Row-wise quantized embedding tables: accuracy per bit width, exact byte counts, hot rows,
forward == dequantized table, saved variants reload exactly, ONNX parity, errors."""
import copy
import math
import os

import numpy as np
import onnx
import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file

import slimcart as sc
from slimcart import UsageError, artifact
from slimcart.accelerate.onnx_export import export_onnx, parity
from slimcart.models.compact_embedding import CompactEmbedding
from slimcart.models.quant_embedding import QuantEmbedding, fit_affine
from slimcart.prune.embedding_rows import EmbeddingRowPruneConfig, embedding_row_prune
from slimcart.quantize.embedding_quant import EmbeddingQuantConfig, embedding_bytes, embedding_quant
from slimcart.quantize.ort import OrtInt8DynamicConfig, ort_int8_dynamic
from slimcart.stage import ModelState, StageContext
from tests.tiny import TINY, tiny, tiny_inputs

SCALES = ("float32", "float16", "log8")
TEXT = ("input_ids", "attention_mask")


def sqnr(ref, approx):
    return 10 * math.log10(float(ref.double().pow(2).sum() / (ref.double() - approx.double()).pow(2).sum()))


@pytest.fixture(scope="module")
def gauss():
    return torch.randn(4000, 32, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def syn():
    """A small synthetic click log and an untrained DeepFM with non-zero first-order tables."""
    task = sc.load_task("ctr", "synthetic:rows=5000,fields=3,vocab=3000")
    model, spec = task.build_baseline()
    with torch.no_grad():
        for e in model.linear_embeddings:
            e.weight.normal_(std=0.1)
    return task, model.eval(), spec


def _quant(model, spec, tmp_path, task=None, **cfg):
    state = ModelState.from_module(copy.deepcopy(model), spec)
    report = embedding_quant(state, EmbeddingQuantConfig(**cfg), StageContext(task, tmp_path))
    return state, report


# Uniform quantization of N(0, 1) at its best clipping range gives about 40.7 / 20.2 / 9.3 dB at
# 8 / 4 / 2 bits; per-row ranges of 32 samples do a little better, the symmetric log8 scales a
# little worse (no bias, 8-bit scales).
@pytest.mark.parametrize("bits,floor", [(8, 40.0), (4, 19.0), (2, 8.0)])
@pytest.mark.parametrize("scale_dtype", SCALES)
def test_round_trip_sqnr(gauss, bits, floor, scale_dtype):
    got = {s: sqnr(gauss, QuantEmbedding.from_float(gauss, bits, scale_dtype, search=s).dequantize())
           for s in ("minmax", "mse")}
    assert got["mse"] > floor
    assert got["mse"] >= got["minmax"] - 0.1  # the least-squares refinement never loses much


@pytest.mark.parametrize("rows,dim,bits,code_bytes", [
    (1000, 16, 4, 1000 * 8), (1000, 16, 2, 1000 * 4), (1000, 16, 8, 1000 * 16),
    (1000, 13, 4, 1000 * 7), (1000, 13, 2, 1000 * 4),          # a row's last byte is padded
    (1001, 1, 4, 501), (1001, 1, 2, 251), (1001, 1, 8, 1001),   # 1-wide: rows share a byte
])
def test_packed_byte_counts(rows, dim, bits, code_bytes):
    w = torch.randn(rows, dim)
    for scale_dtype, per_row in (("float32", 8), ("float16", 4), ("log8", 1)):
        m = QuantEmbedding.from_float(w, bits, scale_dtype)
        assert m.codes.numel() == code_bytes and m.codes.dtype == torch.uint8
        params = rows * per_row + (8 if scale_dtype == "log8" else 0) if dim > 1 else 8
        assert m.nbytes() == code_bytes + params


def test_forward_is_dequantized_lookup(gauss):
    ids = torch.randint(0, 4000, (5, 7))
    for m in (QuantEmbedding.from_float(gauss, 4, "float16"),
              QuantEmbedding.from_float(gauss, 2, "log8", hot_ids=torch.arange(0, 4000, 9)),
              QuantEmbedding.from_float(gauss[:, :1], 4, "float16")):
        out = m(ids)
        assert out.shape == (5, 7, m.dim) and torch.equal(out, m.dequantize()[ids])


@pytest.mark.parametrize("scale_dtype", ("float16", "log8"))
def test_hot_rows_exact_to_their_width(gauss, scale_dtype):
    hot = torch.tensor([0, 5, 77, 3999])
    cold = torch.ones(4000, dtype=torch.bool)
    cold[hot] = False
    plain = QuantEmbedding.from_float(gauss, 2, scale_dtype).dequantize()
    exact = QuantEmbedding.from_float(gauss, 2, scale_dtype, hot_ids=hot, hot_bits=32).dequantize()
    assert torch.equal(exact[hot], gauss[hot]) and torch.equal(exact[cold], plain[cold])
    m8 = QuantEmbedding.from_float(gauss, 2, scale_dtype, hot_ids=hot, hot_bits=8)
    q, scale, bias = fit_affine(gauss[hot], 8, torch.float32, "mse")
    assert torch.equal(m8.dequantize()[hot], q.float() * scale[:, None] + bias[:, None])
    assert torch.equal(m8.dequantize()[cold], plain[cold])
    # no map: the hot rows cost their own bytes only
    assert m8.nbytes() == QuantEmbedding.from_float(gauss, 2, scale_dtype).nbytes() + 4 * (32 + 8)


def test_bad_settings_raise():
    with pytest.raises(ValueError, match="bits"):
        QuantEmbedding(10, 4, bits=3)
    with pytest.raises(ValueError, match="scale_dtype"):
        QuantEmbedding(10, 4, scale_dtype="int8")
    with pytest.raises(ValueError, match="hot"):
        QuantEmbedding(10, 1, bits=2, hot_rows=2)          # 1-wide tables have no hot rows
    with pytest.raises(ValueError, match="hot"):
        QuantEmbedding(1000, 4, bits=2, hot_rows=300)      # 1 code byte per row indexes 256 rows
    for cfg in ({"bits": 3}, {"bits": 16}, {"scale_dtype": "bfloat16"}, {"hot_fraction": 0.1, "bits": 8},
                {"hot_fraction": -0.1}, {"tables": []}, {"search": "grid"}, {"min_rows": 0}, {"bit": 4}):
        with pytest.raises(ValidationError):
            EmbeddingQuantConfig(**cfg)


def test_pattern_matching_nothing_raises(tmp_path):
    model = tiny("deepfm")
    with pytest.raises(UsageError, match=r"embedding_quant\.tables.*'embedding\.\*'") as err:
        _quant(model, TINY["deepfm"], tmp_path, tables=["embeddings.*", "embedding.*"])
    assert "linear_embeddings.0" in err.value.hint
    with pytest.raises(UsageError, match="no embedding table"):
        _quant(torch.nn.Linear(3, 2), {}, tmp_path)
    with pytest.raises(UsageError, match="training split"):
        _quant(model, TINY["deepfm"], tmp_path, bits=2, hot_fraction=0.1)


def test_tiny_deepfm_saved_and_reloaded(tmp_path):
    model, x = tiny("deepfm"), tiny_inputs("deepfm", 64)
    state, report = _quant(model, TINY["deepfm"], tmp_path, bits=4, scale_dtype="log8", min_rows=8)
    assert set(report.changed) == {"embeddings.0", "embeddings.2", "linear_embeddings.0", "linear_embeddings.2"}
    assert "min_rows" in report.skipped["embeddings.1"]
    assert "int4 rows" in report.changed["embeddings.0"] and "SQNR" in report.changed["embeddings.0"]
    s = report.stats
    assert s["embedding_bytes_before"] == embedding_bytes(model) and s["ratio"] > 2
    assert set(s["sqnr_db"]) == {"embeddings.0", "embeddings.2", "linear_embeddings.0", "linear_embeddings.2"}
    folder = artifact.save(state, tmp_path / "m", task={"name": "ctr"}, examples=x, input_names=("sparse", "dense"))
    stored = load_file(str(folder / "model.safetensors"))
    assert stored["embeddings.0.codes"].dtype == torch.uint8 and "embeddings.0.weight" not in stored
    back = artifact.load(folder).torch_model
    assert isinstance(back.embeddings[0], QuantEmbedding) and isinstance(back.embeddings[1], torch.nn.Embedding)
    with torch.no_grad():
        assert torch.equal(back(*x), state.torch_model(*x))
    again = embedding_quant(ModelState.from_module(back, state.spec), EmbeddingQuantConfig(), StageContext(None, tmp_path))
    assert again.skipped["embeddings.0"] == "already quantized"


@pytest.mark.parametrize("cfg", [{"bits": 4}, {"bits": 2, "scale_dtype": "log8", "hot_fraction": 0.1},
                                 {"bits": 8, "scale_dtype": "float32", "hot_fraction": 0.05, "hot_bits": 32}])
def test_onnx_parity(syn, tmp_path, cfg):
    task, model, spec = syn
    state, _ = _quant(model, spec, tmp_path, task, **cfg)
    x = task.example_inputs(300)
    path = export_onnx(state.torch_model, task.example_inputs(2), tmp_path / "m.onnx", task.input_names,
                       task.dynamic_axes())
    assert parity(state.torch_model, path, x, task.input_names)["max_abs_error"] < 1e-5


def test_hot_rows_are_the_most_frequent_training_ids(syn, tmp_path):
    task, model, spec = syn
    state, report = _quant(model, spec, tmp_path, task, bits=2, hot_fraction=0.05)
    emb = state.torch_model.embeddings[1]
    counts = np.bincount(task.splits["train"].inputs[0][:, 1].numpy(), minlength=3000)
    hot = emb.scale < 0
    assert int(hot.sum()) == 150 and "150 hot rows at int8" in report.changed["embeddings.1 (f1)"]
    assert counts[hot.numpy()].min() >= counts[~hot.numpy()].max()
    assert "no hot rows (1-wide table)" in report.changed["linear_embeddings.1 (f1)"]


def test_row_pruned_tables_compose(syn, tmp_path):
    task, model, spec = syn
    state = ModelState.from_module(copy.deepcopy(model), spec)
    embedding_row_prune(state, EmbeddingRowPruneConfig(min_count=2), StageContext(task, tmp_path))
    pruned = copy.deepcopy(state.torch_model)
    # quantize one field's first-order table only, then everything else: maps stay shared
    embedding_quant(state, EmbeddingQuantConfig(tables=["linear_embeddings.0"]), StageContext(task, tmp_path))
    report = embedding_quant(state, EmbeddingQuantConfig(bits=4, hot_fraction=0.05), StageContext(task, tmp_path))
    m = state.torch_model
    assert "id map kept" in report.changed["embeddings.0 (f0)"]
    assert m.linear_embeddings[0]._map_from is m.embeddings[0] and isinstance(m.embeddings[0], QuantEmbedding)
    x = task.example_inputs(256)
    with torch.no_grad():
        assert torch.allclose(m(*x), pruned(*x), atol=0.05)
    folder = artifact.save(state, tmp_path / "m", task={"name": "ctr"}, examples=x, input_names=task.input_names)
    assert not any(k.startswith("linear_embeddings") and "id_map" in k
                   for k in load_file(str(folder / "model.safetensors")))
    back = artifact.load(folder).torch_model
    with torch.no_grad():
        assert torch.equal(back(*x), m(*x))
    path = export_onnx(back, tuple(t[:2] for t in x), tmp_path / "m.onnx", task.input_names, task.dynamic_axes())
    assert parity(back, path, x, task.input_names)["max_abs_error"] < 1e-5
    assert isinstance(pruned.embeddings[0], CompactEmbedding)


def test_text_model_word_embeddings_onnx_and_ort_int8(tmp_path):
    model = tiny("text")
    model.encoder.embeddings.word_embeddings = torch.nn.Embedding(3000, 32, padding_idx=0)
    axes = {n: {0: "b", 1: "s"} for n in TEXT} | {"logits": {0: "b"}}
    x = tiny_inputs("text", 5)
    state, report = _quant(model, {}, tmp_path, bits=4, tables=["*word_embeddings"])
    assert list(report.changed) == ["encoder.embeddings.word_embeddings"]
    assert "not matched by tables" in report.skipped["encoder.embeddings.position_embeddings"]
    float_onnx = export_onnx(model, tiny_inputs("text", 2), tmp_path / "f.onnx", TEXT, axes)
    quant_onnx = export_onnx(state.torch_model, tiny_inputs("text", 2), tmp_path / "q.onnx", TEXT, axes)
    assert parity(state.torch_model, quant_onnx, x, TEXT)["max_abs_error"] < 1e-5
    # the graph's tensors shrink exactly by what the table shrinks; the file, give or take the
    # unpacking nodes (about 40 of them)
    saved = report.stats["embedding_bytes_before"] - report.stats["embedding_bytes_after"]
    tensor_bytes = [sum(len(t.raw_data) for t in onnx.load(str(p)).graph.initializer) for p in (float_onnx, quant_onnx)]
    assert tensor_bytes[0] - tensor_bytes[1] == saved
    assert abs((os.path.getsize(float_onnx) - os.path.getsize(quant_onnx)) - saved) < 16384
    onnx_state = ModelState("onnx", {}, onnx_path=quant_onnx)
    rep = ort_int8_dynamic(onnx_state, OrtInt8DynamicConfig(op_types=["MatMul", "Gemm", "Gather"]),
                           StageContext(None, tmp_path))
    assert sum("MatMul" in n for n in rep.changed) >= 12
    from slimcart.measure.runtimes import OrtRunner

    with torch.inference_mode():
        ref = state.torch_model(*x).numpy()
    got = OrtRunner(onnx_state.onnx_path, TEXT)(x)
    assert np.abs(got - ref).max() < 0.05 * np.abs(ref).max() + 1e-3
