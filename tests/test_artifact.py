import json

import pytest
import torch

from slimcart import ModelError, artifact
from slimcart.accelerate.onnx_export import export_onnx, parity
from slimcart.measure.runtimes import OrtRunner
from slimcart.quantize.dynamic import Int8DynamicConfig, int8_dynamic
from slimcart.stage import ModelState, StageContext
from tests.tiny import TINY, tiny, tiny_inputs

NAMES = {"cnn": ("pixels",), "deepfm": ("sparse", "dense"), "text": ("input_ids", "attention_mask")}
AXES = {"cnn": {"pixels": {0: "b"}}, "deepfm": {"sparse": {0: "b"}, "dense": {0: "b"}},
        "text": {"input_ids": {0: "b", 1: "s"}, "attention_mask": {0: "b", 1: "s"}}}


def _save(state, folder, name):
    return artifact.save(state, folder, task={"name": "t"}, examples=tiny_inputs(name),
                         input_names=NAMES[name])


@pytest.mark.parametrize("name", ["cnn", "deepfm", "text"])
def test_float_artifact_reloads_bit_exact(tmp_path, name):
    model = tiny(name)
    folder = _save(ModelState.from_module(model, TINY[name]), tmp_path / "m", name)
    back = artifact.load(folder).torch_model
    x = tiny_inputs(name)
    with torch.inference_mode():
        assert torch.equal(model(*x), back(*x))
    assert artifact.size_bytes(folder) == (folder / "model.safetensors").stat().st_size + \
        (folder / "slimcart.json").stat().st_size
    assert [t.shape for t in artifact.load_examples(folder)] == [t.shape for t in x]


@pytest.mark.parametrize("name", ["deepfm", "text"])
def test_int8_artifact_reloads_bit_exact_and_is_smaller(tmp_path, name):
    model = tiny(name)
    state = ModelState.from_module(model, TINY[name])
    float_dir = _save(state, tmp_path / "f", name)
    rep = int8_dynamic(state, Int8DynamicConfig(), StageContext(task=None, workdir=tmp_path))
    assert rep.stats["quantized_layers"] == sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    folder = _save(state, tmp_path / "q", name)
    back = artifact.load(folder)
    assert back.format == "torch_int8"
    x = tiny_inputs(name)
    with torch.inference_mode():
        assert torch.equal(state.torch_model(*x), back.torch_model(*x))
        ref = model(*x)
        err = (state.torch_model(*x) - ref).abs().max() / ref.abs().max()
    assert err < 0.05
    meta = json.loads((folder / "slimcart.json").read_text())
    assert meta["quant"]["per_channel"] is True
    if name == "text":  # Linear-dominated: int8 weights take ~1/4 of the bytes of the Linear part
        assert artifact.size_bytes(folder) < 0.8 * artifact.size_bytes(float_dir)


@pytest.mark.parametrize("name", ["cnn", "deepfm", "text"])
def test_onnx_export_matches_eager(tmp_path, name):
    model = tiny(name)
    path = export_onnx(model, tiny_inputs(name, 2), tmp_path / "m.onnx", NAMES[name],
                       AXES[name] | {"logits": {0: "b"}})
    stats = parity(model, path, tiny_inputs(name, 7, seed=5), NAMES[name])
    assert stats["max_abs_error"] < 1e-4
    assert stats["parity_rows"] == 7
    out = OrtRunner(path, NAMES[name])(tiny_inputs(name, 3))
    assert out.shape[0] == 3


def test_damaged_folders_give_clear_errors(tmp_path):
    with pytest.raises(ModelError, match="not a slimcart model folder"):
        artifact.load(tmp_path)
    folder = _save(ModelState.from_module(tiny("cnn"), TINY["cnn"]), tmp_path / "m", "cnn")
    (folder / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ModelError, match="Cannot read"):
        artifact.load(folder)
    meta = json.loads((folder / "slimcart.json").read_text())
    meta["model"]["arch"] = "resnet_huge"
    (folder / "slimcart.json").write_text(json.dumps(meta))
    with pytest.raises(ModelError, match="Unknown model architecture 'resnet_huge'"):
        artifact.load(folder)
