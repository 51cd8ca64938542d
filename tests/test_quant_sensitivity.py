"""Quantization sensitivity and mixed precision: a layer made fragile on purpose (an outlier
weight that sets its int8 scale, on an input that is always zero) is ranked most sensitive and
kept in float, in PyTorch and in ONNX Runtime; every layer's decision is recorded."""
import copy
import json
from dataclasses import dataclass

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from slimcart import artifact
from slimcart.accelerate.onnx_export import export_onnx
from slimcart.errors import ModelError
from slimcart.models.registry import instance_spec
from slimcart.quantize.sensitivity import (Int8MixedConfig, OrtInt8MixedConfig, choose_float, int8_mixed,
                                           layer_sensitivity, ort_int8_mixed, rank_layers, _quantize_layer)
from slimcart.recipe import Recipe, check_order, shipped_recipes
from slimcart.registry import TORCH_INT8
from slimcart.stage import ModelState, StageContext
from slimcart.tasks.base import Split, Task, TrainConfig
from slimcart.tasks.common import ClassificationMixin


def fragile_mlp() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 6)).eval()
    with torch.no_grad():
        model[0].weight[0].zero_()
        model[0].bias[0] = -1.0          # hidden unit 0 is always 0 after the ReLU ...
        model[2].weight[:, 0] = 1000.0   # ... so this outlier column never matters in float, but its
        # int8 scale rounds every other weight of layer 2 to zero; centred logits balance the classes
        model[4].bias -= model(torch.randn(1000, 16, generator=torch.Generator().manual_seed(2))).mean(0)
    return model


@dataclass
class Vectors(ClassificationMixin, Task):
    """Random vectors labelled by the float model itself (its accuracy is 1.0)."""

    name = "vectors"
    metric_names = ("accuracy", "macro_f1")
    primary_metric = "accuracy"
    input_names = ("x",)

    @classmethod
    def make(cls, model: nn.Module) -> "Vectors":
        g = torch.Generator().manual_seed(1)

        def split(n):
            x = torch.randn(n, 16, generator=g)
            with torch.no_grad():
                return Split((x,), model(x).argmax(1))

        return cls(dataset="random", splits={"train": split(128), "val": split(400), "test": split(64)})

    def build_baseline(self, seed: int = 0):
        raise NotImplementedError

    def train_config(self, budget: str = "full") -> TrainConfig:
        return TrainConfig()


@pytest.fixture(scope="module")
def setup():
    model = fragile_mlp()
    return model, Vectors.make(model)


def test_layer_sensitivity_ranks_the_fragile_layer_first(setup):
    model, task = setup
    before = copy.deepcopy(model.state_dict())
    scan = layer_sensitivity(model, task, _quantize_layer(True), ["0", "2", "4"], limit=None, calib_rows=64)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # left as it was
    assert scan["baseline"] == 1.0 and scan["unit"] == "points"
    rows = {r["name"]: r for r in scan["layers"]}
    assert rows["2"]["metric_drop"] > 30 and rows["2"]["sqnr_db"] < 10
    assert all(rows[n]["metric_drop"] < 5 and rows[n]["sqnr_db"] > 25 for n in ("0", "4"))
    ranked = rank_layers(scan["layers"])
    assert ranked[0]["name"] == "2"
    assert choose_float(ranked, keep_float=1) == ["2"]
    assert choose_float(ranked, max_drop=100.0) == []
    assert choose_float(ranked, max_drop=0.0)[0] == "2"


@pytest.mark.parametrize("settings", [{"max_drop": 5.0}, {"keep_float": 1}])
def test_int8_mixed_keeps_the_fragile_layer_float(setup, tmp_path, settings):
    model, task = setup
    state = ModelState.from_module(copy.deepcopy(model), instance_spec(model))
    report = int8_mixed(state, Int8MixedConfig(limit=None, **settings), StageContext(task, tmp_path, progress=False))
    assert state.format == TORCH_INT8 and state.quant["layers"] == ["0", "4"]
    assert report.skipped["2"].startswith("kept float: drop ")
    assert "SQNR" in report.skipped["2"] and set(report.changed) | set(report.skipped) == {"0", "2", "4"}
    table = json.loads(json.dumps(report.stats["sensitivity"]))  # plain JSON
    assert [set(r) for r in table["layers"]] == [{"name", "op", "sqnr_db", "metric_drop", "decision"}] * 3
    assert table["layers"][0]["name"] == "2" and table["layers"][0]["decision"] == "float"
    assert report.stats["measured_drop_pts"] <= 5.0
    assert task.evaluate(state.torch_model, "test")["accuracy"] >= 0.95
    folder = artifact.save(state, tmp_path / "m", task={"name": "vectors"}, examples=(torch.randn(2, 16),),
                           input_names=("x",))
    x = task.splits["test"].inputs[0]
    with torch.inference_mode():
        assert torch.equal(artifact.load(folder).torch_model(x), state.torch_model(x))


def test_ort_int8_mixed_keeps_the_fragile_node_float(setup, tmp_path):
    model, task = setup
    path = export_onnx(model, (torch.randn(2, 16),), tmp_path / "m.onnx", ("x",), {"x": {0: "b"}, "logits": {0: "b"}})
    state = ModelState("onnx", {}, onnx_path=path)
    report = ort_int8_mixed(state, OrtInt8MixedConfig(op_types=["MatMul", "Gemm"], max_drop=5.0, limit=None, calib_rows=64),
                            StageContext(task, tmp_path / "work", progress=False))
    table = report.stats["sensitivity"]["layers"]
    # ONNX Runtime's quantizer splits each Gemm X into X_MatMul + X_Add and names nodes so
    assert table[0]["name"] == "/2/Gemm_MatMul" and table[0]["decision"] == "float" and table[0]["op"] == "Gemm"
    assert report.skipped["/2/Gemm_MatMul"].startswith("kept float")
    assert "/4/Gemm_MatMul" in report.changed and len(report.changed) + len(report.skipped) == 3
    assert report.stats["measured_drop_pts"] <= 5.0
    from slimcart.measure.runtimes import OrtRunner

    out = task.predict(OrtRunner(state.onnx_path, ("x",)), "test")
    assert task.metrics(out, task.labels("test"))["accuracy"] >= 0.95


def test_nothing_to_quantize_is_a_clear_error(setup, tmp_path):
    model, task = setup
    path = export_onnx(model, (torch.randn(2, 16),), tmp_path / "m.onnx", ("x",), {"x": {0: "b"}, "logits": {0: "b"}})
    with pytest.raises(ModelError, match="quantizes no Gemm node"):
        ort_int8_mixed(ModelState("onnx", {}, onnx_path=path), OrtInt8MixedConfig(op_types=["Gemm"]),
                       StageContext(task, tmp_path / "work", progress=False))


def test_config_errors():
    with pytest.raises(ValidationError):
        Int8MixedConfig(max_drop=-1)
    with pytest.raises(ValidationError):
        OrtInt8MixedConfig(op_types=["Softmax"])


def test_shipped_recipes_validate():
    for name in ("intent/int8-mixed", "intent/onnx-int8-mixed"):
        assert check_order(Recipe.load(shipped_recipes()[name]).stages) == []
