"""Weight-only INT8/INT4: exact packing, a per-element error bound, outputs close to float,
packed bytes on disk with identical outputs after reload, ONNX export, MatMulNBits with ONNX
Runtime, and clear errors for bad settings."""
import copy
import os

import numpy as np
import onnx
import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file

from slimcart import artifact
from slimcart.accelerate.onnx_export import export_onnx
from slimcart.errors import UsageError
from slimcart.measure.runtimes import OrtRunner
from slimcart.models.weight_only_linear import (WeightOnlyLinear, pack_int4, quantize_groups,
                                                unpack_int4)
from slimcart.quantize.sensitivity import sqnr_db
from slimcart.quantize.weight_only import (OrtWeightOnlyConfig, WeightOnlyConfig, ort_weight_only,
                                           weight_only)
from slimcart.recipe import Recipe, check_order, shipped_recipes
from slimcart.stage import ModelState, StageContext
from tests.tiny import TINY, tiny, tiny_inputs

NAMES = ("input_ids", "attention_mask")
AXES = {n: {0: "b", 1: "s"} for n in NAMES} | {"logits": {0: "b"}}


class TextTask:
    """What the stages use: example inputs and input names."""

    input_names = NAMES

    def example_inputs(self, batch, split="test"):
        return tiny_inputs("text", batch)


def _ctx(tmp_path, i=0):
    return StageContext(TextTask(), tmp_path / "work", i, progress=False)


def _quantized(tmp_path, **cfg):
    model = tiny("text")
    state = ModelState.from_module(copy.deepcopy(model), TINY["text"])
    report = weight_only(state, WeightOnlyConfig(**cfg), _ctx(tmp_path))
    return model, state, report


def test_int4_pack_unpack_is_exact(monkeypatch):
    codes = torch.randint(0, 16, (7, 38), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    packed = pack_int4(codes)
    assert packed.shape == (7, 19) and packed.dtype == torch.uint8
    assert torch.equal(unpack_int4(packed), codes)
    monkeypatch.setattr(torch.onnx, "is_in_onnx_export", lambda: True)  # the arithmetic path
    assert torch.equal(unpack_int4(packed).to(torch.uint8), codes)


@pytest.mark.parametrize("bits,symmetric,min_db", [(8, True, 38.0), (8, False, 38.0), (4, True, 14.0),
                                                   (4, False, 15.0)])
def test_group_dequant_error_is_bounded(bits, symmetric, min_db):
    w = torch.randn(48, 200, generator=torch.Generator().manual_seed(1))  # 200: last group padded
    lin = torch.nn.Linear(200, 48)
    lin.weight.data.copy_(w)
    mod = WeightOnlyLinear.from_linear(lin, bits, 64, symmetric)
    deq = mod.dequantize()
    assert deq.shape == w.shape
    # every weight is within half a step of its group's scale (round to nearest, no clipping)
    step = mod.scales.repeat_interleave(64, dim=1)[:, :200]
    assert ((deq - w).abs() <= step / 2 + 1e-6).all()
    assert sqnr_db(w, deq) >= min_db
    codes, _, _ = quantize_groups(w, bits, 64, symmetric)
    assert int(codes.max()) <= 2 ** bits - 1 and (symmetric is False or int(codes.min()) >= 1)


def test_tiny_text_outputs_stay_close_to_float(tmp_path):
    model, state, report = _quantized(tmp_path, bits=8, group_size=32)
    x = tiny_inputs("text", 5)
    with torch.inference_mode():
        ref, got = model(*x), state.torch_model(*x)
    assert sqnr_db(ref, got) > 35
    assert report.stats["quantized_layers"] == 13  # 6 per encoder layer x 2 + the head
    assert all("int8 weights" in v for v in report.changed.values())
    assert any("Embedding" in v for v in report.skipped.values())
    model4, state4, rep4 = _quantized(tmp_path / "4", bits=4, group_size=16)
    with torch.inference_mode():
        got4 = state4.torch_model(*x)
    assert 12 < sqnr_db(ref, got4) < sqnr_db(ref, got)


@pytest.mark.parametrize("bits,min_ratio", [(8, 3.5), (4, 6.0)])
def test_saved_bytes_shrink_and_reload_is_identical(tmp_path, bits, min_ratio):
    model, state, _ = _quantized(tmp_path, bits=bits, group_size=128)
    x = tiny_inputs("text", 4)
    folders = {}
    for name, st in (("float", ModelState.from_module(model, TINY["text"])), ("q", state)):
        folders[name] = artifact.save(st, tmp_path / name, task={"name": "t"}, examples=x, input_names=NAMES)
    linear = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]

    def weight_bytes(folder):  # Linear weights (float) or codes + scales; biases stay float32
        tensors = load_file(str(folder / "model.safetensors"))
        return sum(t.numel() * t.element_size() for k, t in tensors.items()
                   if any(k.startswith(n + ".") for n in linear) and not k.endswith(".bias"))

    assert weight_bytes(folders["float"]) / weight_bytes(folders["q"]) >= min_ratio
    assert artifact.size_bytes(folders["q"]) < artifact.size_bytes(folders["float"])
    loaded = artifact.load(folders["q"])
    assert all(isinstance(loaded.torch_model.get_submodule(n), WeightOnlyLinear) for n in linear)
    with torch.inference_mode():
        assert torch.equal(loaded.torch_model(*x), state.torch_model(*x))


def test_weight_only_module_exports_to_onnx(tmp_path):
    _, state, _ = _quantized(tmp_path, bits=4, group_size=16)
    x = tiny_inputs("text", 3)
    path = export_onnx(state.torch_model, tiny_inputs("text", 2), tmp_path / "wo.onnx", NAMES, AXES)
    with torch.inference_mode():
        ref = state.torch_model(*x).numpy()
    assert np.abs(OrtRunner(path, NAMES)(x) - ref).max() < 1e-4


@pytest.mark.parametrize("bits,tol", [(8, 0.01), (4, 0.05)])
def test_ort_weight_only_gives_matmulnbits_close_to_float(tmp_path, bits, tol):
    model = tiny("text")
    path = export_onnx(model, tiny_inputs("text", 2), tmp_path / "m.onnx", NAMES, AXES)
    state = ModelState("onnx", {}, onnx_path=path)
    rep = ort_weight_only(state, OrtWeightOnlyConfig(bits=bits, block_size=16, accuracy_level=4,
                                                     exclude=["*layer.1/output/dense/MatMul"]), _ctx(tmp_path))
    ops = [n.op_type for n in onnx.load(str(state.onnx_path)).graph.node]
    assert ops.count("MatMulNBits") == 11 and rep.stats["quantized_nodes"] == 11
    assert rep.skipped["/encoder/encoder/layer.1/output/dense/MatMul"] == "excluded by pattern"
    assert "Gemm" in rep.skipped["/head/Gemm"]
    assert sum("no constant weight" in v for v in rep.skipped.values()) == 4  # QK^T and PV per layer
    assert rep.stats["weight_bytes_after"] < rep.stats["weight_bytes_before"] * (0.35 if bits == 8 else 0.2)
    x = tiny_inputs("text", 5)
    with torch.inference_mode():
        ref = model(*x).numpy()
    assert np.abs(OrtRunner(state.onnx_path, NAMES)(x) - ref).max() < tol * np.abs(ref).max()


def test_ort_weight_only_embedding_tables(tmp_path):
    model = tiny("text")
    path = export_onnx(model, tiny_inputs("text", 2), tmp_path / "m.onnx", NAMES, AXES)
    state = ModelState("onnx", {}, onnx_path=path)
    rep = ort_weight_only(state, OrtWeightOnlyConfig(bits=4, block_size=16, op_types=["MatMul", "Gather"]),
                          _ctx(tmp_path))
    assert "GatherBlockQuantized" in rep.changed["/encoder/embeddings/word_embeddings/Gather"]
    assert rep.stats["weight_bytes_after"] < 0.2 * rep.stats["weight_bytes_before"]
    assert os.path.getsize(state.onnx_path) < 0.6 * os.path.getsize(path)


def test_bad_settings_give_clear_errors(tmp_path):
    for bad in ({"bits": 3}, {"block_size": 48}, {"block_size": 8}, {"bits": 8, "op_types": ["MatMul", "Gather"]},
                {"op_types": ["Conv"]}):
        with pytest.raises(ValidationError):
            OrtWeightOnlyConfig(**bad)
    for bad in ({"bits": 2}, {"group_size": 33}, {"group_size": 0}):
        with pytest.raises(ValidationError):
            WeightOnlyConfig(**bad)
    with pytest.raises(UsageError, match="matches no layer"):
        _quantized(tmp_path, exclude=["nope*"])
    _, state, _ = _quantized(tmp_path)
    with pytest.raises(UsageError, match="already"):
        weight_only(state, WeightOnlyConfig(), _ctx(tmp_path))


def test_shipped_recipes_validate():
    for name in ("intent/onnx-int4-weights",):
        recipe = Recipe.load(shipped_recipes()[name])
        assert check_order(recipe.stages) == []
