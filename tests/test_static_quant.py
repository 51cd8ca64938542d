"""Static INT8 (ONNX Runtime QDQ, calibrated on the task's data) and the CPU's int8 scheme choice."""
from dataclasses import dataclass

import numpy as np
import onnx
import pytest
import torch

from slimcart.accelerate.onnx_export import export_onnx
from slimcart.errors import DataError, UsageError
from slimcart.measure.runtimes import OrtRunner
from slimcart.quantize import int8_features
from slimcart.quantize.static_ort import OrtInt8StaticConfig, ort_int8_static
from slimcart.stage import ModelState, StageContext
from slimcart.tasks.base import Split, Task, TrainConfig
from slimcart.tasks.common import ClassificationMixin
from tests.tiny import TINY, tiny


@dataclass
class TinyImageTask(ClassificationMixin, Task):
    """Random 16x16 images in 5 classes: a real Task (batches, training, agreement) in a few KB."""

    name = "tiny_image"
    metric_names = ("accuracy", "macro_f1")
    primary_metric = "accuracy"
    input_names = ("pixels",)

    @classmethod
    def make(cls, rows: int = 256, size: int = 16, seed: int = 0, dtype=torch.float32) -> "TinyImageTask":
        g = torch.Generator().manual_seed(seed)

        def split(n):
            x = torch.randn(n, 1, size, size, generator=g).to(dtype)
            return Split((x,), torch.randint(0, 5, (n,), generator=g))

        return cls("tiny", {"train": split(rows), "val": split(64), "test": split(64)})

    def build_baseline(self, seed: int = 0):
        return tiny("cnn", seed), TINY["cnn"]

    def train_config(self, budget: str = "full") -> TrainConfig:
        return TrainConfig(epochs=1.0, batch_size=32, lr=1e-3)


@dataclass
class TinyTextTask(TinyImageTask):
    name = "tiny_text"
    input_names = ("input_ids", "attention_mask")

    @classmethod
    def make(cls, rows: int = 96, seed: int = 0, **_) -> "TinyTextTask":
        g = torch.Generator().manual_seed(seed)

        def split(n):
            ids = torch.randint(1, 100, (n, 12), generator=g)
            mask = (torch.arange(12) < torch.randint(4, 13, (n, 1), generator=g)).long()
            return Split((ids * mask, mask), torch.randint(0, 3, (n,), generator=g))

        return cls("tiny", {"train": split(rows), "val": split(32), "test": split(32)})

    def dynamic_axes(self):
        return {"input_ids": {0: "b", 1: "s"}, "attention_mask": {0: "b", 1: "s"}, "logits": {0: "b"}}


def exported(task, tmp_path, name: str = "cnn"):
    model = tiny(name)
    path = export_onnx(model, task.example_inputs(2, "val"), tmp_path / "float.onnx", task.input_names,
                       task.dynamic_axes())
    return model, ModelState("onnx", TINY[name], onnx_path=path)


def quantize(task, state, tmp_path, **cfg):
    return ort_int8_static(state, OrtInt8StaticConfig(**cfg), StageContext(task, tmp_path / "work", 1, progress=False))


def test_cnn_runs_integer_kernels_and_stays_close(tmp_path):
    task = TinyImageTask.make()
    model, state = exported(task, tmp_path)
    float_path = state.onnx_path
    rep = quantize(task, state, tmp_path, calibration_size=128)
    ops = {n.op_type for n in onnx.load(str(state.onnx_path)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    convs = [n for n, op in ((n.name, n.op_type) for n in onnx.load(str(float_path)).graph.node) if op == "Conv"]
    assert len(convs) == 9 and all(rep.changed[c].startswith("Conv -> QLinearConv") for c in convs)
    assert rep.stats["integer_ops_after_ort_optimization"]["QLinearConv"] == 9
    assert rep.stats["calibration"] == {"split": "train", "rows": 128, "batches": 2, "method": "minmax"}
    assert rep.stats["cpu_int8_features"] == int8_features.detect()[0]
    assert rep.notes and rep.notes[0].startswith("INT8 scheme") and state.quant["scheme"] == "static"
    x = task.example_inputs(64, "test")
    with torch.inference_mode():
        ref = model(*x).numpy()
    got = OrtRunner(state.onnx_path, task.input_names)(x)
    assert np.abs(got - ref).max() < 0.1 * np.abs(ref).max()
    assert (got.argmax(1) == ref.argmax(1)).mean() >= 0.9
    assert rep.stats["agreement_top1_agreement"] >= 0.9 and rep.stats["parity_reference"] == "the float ONNX graph"


def _scales(path) -> dict[str, float]:
    g = onnx.load(str(path)).graph
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in g.initializer}
    return {n.input[1]: float(inits[n.input[1]]) for n in g.node if n.op_type == "QuantizeLinear"}


@pytest.mark.parametrize("method", ["minmax", "entropy", "percentile"])
def test_each_calibration_method_runs_and_sets_its_own_ranges(method, tmp_path):
    task = TinyImageTask.make()
    _, state = exported(task, tmp_path)
    float_path = state.onnx_path
    rep = quantize(task, state, tmp_path, calibrate_method=method, calibration_size=128, percentile=99.9,
                   num_bins=256 if method == "entropy" else None)
    assert rep.stats["calibration"]["method"] == method
    assert rep.stats["integer_ops_after_ort_optimization"]["QLinearConv"] == 9
    assert rep.stats["agreement_top1_agreement"] >= 0.8
    if method != "minmax":  # a histogram method clips the tails: not the min/max ranges again
        ref = ModelState("onnx", {}, onnx_path=float_path)
        quantize(task, ref, tmp_path / "mm", calibration_size=128)
        mm, own = _scales(ref.onnx_path), _scales(state.onnx_path)
        assert any(abs(own[k] - mm[k]) > 1e-3 * mm[k] for k in mm)


@pytest.mark.parametrize("features, level, reduce_range", [
    (["avx", "avx2", "fma"], "avx2", True),
    (["avx2", "avx512f", "avx512bw"], "avx512bw", True),
    (["avx2", "avx512f", "avx512bw", "avx512_vnni"], "avx512_vnni", False),
    (["avx2", "avx_vnni"], "avx_vnni", False),
    (["avx2", "avx512bw", "avx512_vnni", "amx_tile", "amx_int8"], "amx_int8", False),
    (["asimd", "asimddp"], "arm", False),
    ([], "unknown", True),
])
def test_int8_scheme_for_each_cpu_kind(features, level, reduce_range):
    s = int8_features.recommend(features)
    assert (s.level, s.reduce_range, s.weight_type) == (level, reduce_range, "int8")
    assert s.activation_type == ("int8" if level == "arm" else "uint8")
    assert s.saturates == (level in ("avx2", "avx512bw")) and s.reason
    explicit_8bit = int8_features.risk(s, s.activation_type, "int8", False)
    assert (explicit_8bit is not None) == s.saturates
    if s.saturates:
        assert "saturate" in explicit_8bit and int8_features.risk(s, "uint8", "uint8", False).startswith("U8U8")


def test_auto_scheme_follows_the_cpu_and_risky_choices_are_noted(tmp_path, monkeypatch):
    task = TinyImageTask.make(rows=64)
    vnni = ["avx2", "avx512bw", "avx512_vnni"]
    monkeypatch.setattr(int8_features, "detect", lambda: (vnni, int8_features.recommend(vnni)))
    _, state = exported(task, tmp_path)
    rep = quantize(task, state, tmp_path, calibration_size=64)
    assert rep.stats["scheme"] == {"activation_type": "uint8", "weight_type": "int8", "reduce_range": False}
    assert "VNNI" in rep.notes[0] and "Risky" not in rep.notes[0]
    avx2 = ["avx", "avx2"]
    monkeypatch.setattr(int8_features, "detect", lambda: (avx2, int8_features.recommend(avx2)))
    _, state = exported(task, tmp_path)
    rep = quantize(task, state, tmp_path, calibration_size=64, reduce_range=False)
    assert rep.stats["scheme"]["reduce_range"] is False and "Risky here" in rep.notes[0]


@pytest.mark.parametrize("problem, words", [
    ("nan", ["'pixels'", "NaN"]),
    ("shape", ["'pixels'", "shape (64, 1, 12, 12)"]),
    ("dtype", ["'pixels'", "float64"]),
])
def test_bad_calibration_data_is_a_clear_error(problem, words, tmp_path):
    _, state = exported(TinyImageTask.make(rows=64), tmp_path)
    task = TinyImageTask.make(rows=64, size=12 if problem == "shape" else 16,
                              dtype=torch.float64 if problem == "dtype" else torch.float32)
    if problem == "nan":
        task.splits["train"].inputs[0][5, 0, 3, 3] = float("nan")
    with pytest.raises(DataError) as err:
        quantize(task, state, tmp_path, calibration_size=64)
    assert all(w in err.value.message for w in words), err.value.message


def test_exclude_patterns(tmp_path):
    task = TinyImageTask.make(rows=64)
    _, state = exported(task, tmp_path)
    with pytest.raises(UsageError, match="matches no node"):
        quantize(task, state, tmp_path, exclude=["/nothing/*"])
    rep = quantize(task, state, tmp_path, calibration_size=64, exclude=["/stem/*"])
    assert rep.skipped["/stem/stem.0/Conv"] == "excluded by pattern"
    assert rep.stats["integer_ops_after_ort_optimization"]["QLinearConv"] == 8
    with pytest.raises(UsageError, match="no split 'calib'"):
        quantize(task, state, tmp_path, calibration="calib")


def test_transformer_quantizes_weight_matmuls_only(tmp_path):
    task = TinyTextTask.make()
    model, state = exported(task, tmp_path, "text")
    rep = quantize(task, state, tmp_path, op_types=["MatMul", "Gemm", "Gather"], matmul_const_b_only=True,
                   calibration_size=96, calibration_batch=32, parity_batch=32)
    assert rep.stats["integer_ops_after_ort_optimization"].get("QLinearMatMul", 0) >= 12  # q, k, v, o, ffn x 2
    two_activations = [r for r in rep.skipped.values() if "two activations" in r]
    assert len(two_activations) == 4  # scores and context, in 2 layers
    assert all("two activations" in r or "integer tensor" in r for r in rep.skipped.values())
    tables = [n for n, r in rep.changed.items() if r.startswith("Gather")]
    assert len(tables) == 3  # word, position and token-type embeddings read int8 tables
    x = task.example_inputs(32, "test")
    with torch.inference_mode():
        ref = model(*x).numpy()
    got = OrtRunner(state.onnx_path, task.input_names)(x)
    assert np.abs(got - ref).max() < 0.1 * np.abs(ref).max() + 1e-3
