"""Half precision: weights in the half dtype except the float32 norm layers, float32 at the model
boundary, outputs close, dtypes kept through save and load, ONNX float16, and the CPU note."""
import copy

import numpy as np
import onnx
import pytest
import torch

from slimcart import artifact
from slimcart.accelerate.onnx_export import export_onnx
from slimcart.errors import ModelError, UsageError
from slimcart.measure import hardware
from slimcart.measure.runtimes import OrtRunner
from slimcart.quantize.half import NORMS, HalfConfig, half
from slimcart.quantize.sensitivity import sqnr_db
from slimcart.recipe import Recipe, check_order, shipped_recipes
from slimcart.stage import ModelState, StageContext
from tests.tiny import TINY, tiny, tiny_inputs

NAMES = {"cnn": ("image",), "text": ("input_ids", "attention_mask")}
DT = {"float16": torch.float16, "bfloat16": torch.bfloat16}


class FakeTask:
    def __init__(self, name):
        self.name, self.input_names = name, NAMES[name]

    def example_inputs(self, batch, split="test"):
        return tiny_inputs(self.name, batch)


def _half(name, tmp_path, **cfg):
    model = tiny(name)
    state = ModelState.from_module(copy.deepcopy(model), TINY[name])
    report = half(state, HalfConfig(**cfg), StageContext(FakeTask(name), tmp_path / "work", progress=False))
    return model, state, report


def _is_kept(model, name):
    return isinstance(model.get_submodule(name), NORMS) or any(
        isinstance(model.get_submodule(name[:i]), NORMS) for i in range(len(name)) if name[i] == ".")


@pytest.mark.parametrize("name", ["cnn", "text"])
@pytest.mark.parametrize("dtype,min_db", [("float16", 50.0), ("bfloat16", 30.0)])
def test_weights_cast_norms_kept_and_outputs_close(name, dtype, min_db, tmp_path):
    model, state, report = _half(name, tmp_path, dtype=dtype)
    qm = state.torch_model
    for pname, p in qm.named_parameters():
        owner = pname.rpartition(".")[0]
        assert p.dtype == (torch.float32 if _is_kept(qm, owner) else DT[dtype]), pname
    assert report.stats["kept_fp32"] == sum(isinstance(m, NORMS) for m in qm.modules())
    assert all(v.startswith("kept float32") for v in report.skipped.values())
    x = tiny_inputs(name, 5)
    with torch.inference_mode():
        ref, got = model(*x), qm(*x)
    assert got.dtype == torch.float32  # the task code sees float32
    assert sqnr_db(ref, got) > min_db
    assert report.stats["state_bytes_after"] < 0.6 * report.stats["state_bytes_before"]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_save_load_keeps_dtypes_and_outputs(dtype, tmp_path):
    _, state, _ = _half("text", tmp_path, dtype=dtype)
    x = tiny_inputs("text", 4)
    folder = artifact.save(state, tmp_path / "m", task={"name": "t"}, examples=x, input_names=NAMES["text"])
    loaded = artifact.load(folder).torch_model
    assert {k: v.dtype for k, v in loaded.state_dict().items()} == \
           {k: v.dtype for k, v in state.torch_model.state_dict().items()}
    with torch.inference_mode():
        assert torch.equal(loaded(*x), state.torch_model(*x))


def test_exclude_keeps_a_layer_float32_and_bad_patterns_fail(tmp_path):
    _, state, report = _half("text", tmp_path, dtype="float16", exclude=["head"])
    assert state.torch_model.head.weight.dtype == torch.float32
    assert report.skipped["head"] == "kept float32: excluded by pattern"
    with pytest.raises(UsageError, match="matches no layer"):
        _half("text", tmp_path, exclude=["nothing*"])


def test_cpu_note_follows_the_cpu_features(tmp_path, monkeypatch):
    monkeypatch.setattr(hardware, "has_cpu_feature", lambda *names: False)
    _, _, report = _half("cnn", tmp_path, dtype="bfloat16")
    note = next(n for n in report.notes if "storage format" in n)
    assert "avx512_bf16" in note and "slower than float32" in note
    monkeypatch.setattr(hardware, "has_cpu_feature", lambda *names: "amx_fp16" in names)
    _, _, report = _half("cnn", tmp_path / "b", dtype="float16")
    assert report.notes == []


def test_onnx_float16_graph(tmp_path):
    model = tiny("text")
    names = NAMES["text"]
    axes = {n: {0: "b", 1: "s"} for n in names} | {"logits": {0: "b"}}
    path = export_onnx(model, tiny_inputs("text", 2), tmp_path / "m.onnx", names, axes)
    state = ModelState("onnx", {}, onnx_path=path)
    ctx = StageContext(FakeTask("text"), tmp_path / "work", progress=False)
    report = half(state, HalfConfig(dtype="float16"), ctx)
    graph = onnx.load(str(state.onnx_path)).graph
    fp16 = [t for t in graph.initializer if t.data_type == onnx.TensorProto.FLOAT16]
    assert fp16 and graph.input[0].type.tensor_type.elem_type != onnx.TensorProto.FLOAT16
    assert graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert any("LayerNormalization" in v for v in report.skipped.values())
    weights = [sum(onnx.numpy_helper.to_array(t).nbytes for t in onnx.load(str(p)).graph.initializer)
               for p in (path, state.onnx_path)]
    assert weights[1] < 0.55 * weights[0]  # (the tiny graph's file is mostly node names)
    x = tiny_inputs("text", 5)
    with torch.inference_mode():
        ref = model(*x).numpy()
    assert np.abs(OrtRunner(state.onnx_path, names)(x) - ref).max() < 1e-2 * np.abs(ref).max()
    with pytest.raises(UsageError, match="float16 only"):
        half(ModelState("onnx", {}, onnx_path=path), HalfConfig(dtype="bfloat16"), ctx)


def test_bfloat16_export_is_refused_with_a_reason(tmp_path):
    _, state, _ = _half("cnn", tmp_path, dtype="bfloat16")
    with pytest.raises(ModelError, match="bfloat16 model cannot be exported"):
        export_onnx(state.torch_model, tiny_inputs("cnn", 2), tmp_path / "x.onnx", ("image",),
                    {"image": {0: "b"}, "logits": {0: "b"}})


def test_shipped_recipe_validates():
    recipe = Recipe.load(shipped_recipes()["product_image/bf16"])
    assert check_order(recipe.stages) == []
    assert [str(r) for r in recipe.measure.runtimes] == ["torch"]


def test_recasting_the_whole_model_keeps_it_consistent(tmp_path):
    """A runner may move or cast the whole module (``model.to(device, dtype)``): the boundary casts
    follow the weights, so the model still runs, in float32 or all in the half type."""
    model, state, _ = _half("text", tmp_path, dtype="bfloat16")
    x = tiny_inputs("text", 3)
    with torch.inference_mode():
        ref = model(*x)
        for dtype, min_db in ((torch.float32, 40.0), (torch.bfloat16, 20.0)):  # weights were rounded
            got = copy.deepcopy(state.torch_model).to(dtype=dtype)(*x)
            assert got.dtype == torch.float32 and sqnr_db(ref, got) > min_db


def test_float16_note_on_a_cpu_with_avx512_fp16_only(tmp_path, monkeypatch):
    monkeypatch.setattr(hardware, "has_cpu_feature", lambda *names: "avx512_fp16" in names)
    _, _, report = _half("cnn", tmp_path, dtype="float16")
    assert any("prefer bfloat16" in n for n in report.notes)
