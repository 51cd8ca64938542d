"""Quantization-aware fine-tuning: a QDQ ONNX graph with int8 weights that ONNX Runtime runs in
integer kernels and that computes what the fake-quant PyTorch model computes."""
import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from slimcart.errors import ModelError, UsageError
from slimcart.measure.runtimes import OrtRunner
from slimcart.quantize import int8_features, qat as qat_module
from slimcart.quantize.qat import QatConfig, qat
from slimcart.stage import ModelState, StageContext
from tests.test_static_quant import TinyImageTask
from tests.tiny import TINY, tiny


def run(tmp_path, monkeypatch, model=None, **cfg):
    """The qat stage on a tiny task; also returns the fake-quant model it exported (caught on its way
    to the stage's own parity check)."""
    seen = {}
    original = qat_module._parity

    def catch(task, model, path, rows):
        seen["model"] = model
        return original(task, model, path, rows)

    monkeypatch.setattr(qat_module, "_parity", catch)
    task = TinyImageTask.make(rows=128)
    state = ModelState.from_module(model or tiny("cnn"), TINY["cnn"])
    cfg = {"train": {"max_steps": 4, "batch_size": 32}, "calibration_batches": 2, "parity_batch": 64} | cfg
    rep = qat(state, QatConfig(**cfg), StageContext(task, tmp_path / "work", 0, progress=False))
    return task, state, rep, seen.get("model")


def weights(path) -> dict[str, np.ndarray]:
    g = onnx.load(str(path)).graph
    inits = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    return {n.input[0]: inits[n.input[0]] for n in g.node
            if n.op_type == "DequantizeLinear" and inits.get(n.input[0], np.zeros(1)).ndim > 1}


def test_qat_exports_int8_qdq_that_matches_the_fake_quant_model(tmp_path, monkeypatch):
    avx2 = ["avx", "avx2"]
    monkeypatch.setattr(int8_features, "detect", lambda: (avx2, int8_features.recommend(avx2)))
    task, state, rep, fq = run(tmp_path, monkeypatch)
    assert state.format == "onnx" and state.torch_model is None and state.quant["scheme"] == "qat"
    ops = {n.op_type for n in onnx.load(str(state.onnx_path)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops and "BatchNormalization" not in ops
    w = weights(state.onnx_path)
    assert len(w) == 10 and all(a.dtype == np.int8 for a in w.values())   # 9 convs + fc, stored as int8
    assert all(a.min() >= -64 and a.max() <= 63 for a in w.values())      # 7 bits on AVX2 without VNNI
    assert not any(t.data_type == onnx.TensorProto.FLOAT and len(t.dims) == 4
                   for t in onnx.load(str(state.onnx_path)).graph.initializer)  # no float conv weights left
    assert rep.stats["integer_ops_after_ort_optimization"] == {"QLinearAdd": 3, "QLinearConv": 9}
    assert rep.stats["train"]["steps"] == 4 and rep.stats["weights_folded_to_int8"] == 10
    assert sum(v.startswith("BatchNorm folded") for v in rep.changed.values()) == 9
    assert "reduce_range" in rep.notes[0] and rep.notes[1].startswith("QAT:")
    x = task.example_inputs(64, "test")
    with torch.inference_mode():
        ref = fq(*x).numpy()
    got = OrtRunner(state.onnx_path, task.input_names)(x)
    assert np.abs(got - ref).max() < 0.02 * np.abs(ref).max()
    assert (got.argmax(1) == ref.argmax(1)).mean() >= 0.95
    assert rep.stats["max_rel_error"] < 0.02 and rep.stats["parity_reference"] == "the fake-quant PyTorch model"


def test_full_8bit_weights_where_the_cpu_accumulates_in_32_bits(tmp_path, monkeypatch):
    vnni = ["avx2", "avx512bw", "avx512_vnni"]
    monkeypatch.setattr(int8_features, "detect", lambda: (vnni, int8_features.recommend(vnni)))
    _, state, rep, _ = run(tmp_path, monkeypatch, exclude=["fc"])
    assert rep.stats["scheme"]["reduce_range"] is False
    w = weights(state.onnx_path)
    assert len(w) == 9 and max(int(np.abs(a).max()) for a in w.values()) > 64
    assert rep.skipped == {"fc": "excluded by pattern"}


def test_bad_patterns_and_untraceable_models_are_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(UsageError, match="matches no Conv/Linear"):
        run(tmp_path, monkeypatch, exclude=["decoder.*"])

    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3)
            self.fc = nn.Linear(4, 5)

        def forward(self, x):
            y = self.conv(x)
            if y.mean() > 0:  # data-dependent: torch.fx cannot trace it
                y = -y
            return self.fc(y.mean((2, 3)))

    with pytest.raises(ModelError, match="does not trace"):
        run(tmp_path, monkeypatch, model=Branchy())
