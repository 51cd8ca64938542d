import re

import pytest
import torch
from safetensors.torch import save_file

from slimcart import artifact
from slimcart.models import build
from slimcart.stage import ModelState
from slimcart.storage import decode, encode
from slimcart.storage.sparse import decode_state, encode_state
from tests.tiny import TINY, tiny_inputs

SHAPES = [(4096,), (64, 80), (16, 16, 20), (6, 8, 9, 10)]


def _sparse(shape, sparsity, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(shape, generator=g).to(dtype)
    t[torch.rand(shape, generator=g) < sparsity] = 0
    if sparsity == 1.0:
        t.zero_()
    return t


def _file_bytes(tmp_path, tensors, name):
    save_file(tensors, str(tmp_path / name))
    return (tmp_path / name).stat().st_size


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 0.99, 1.0])
@pytest.mark.parametrize("shape", SHAPES)
def test_round_trip_is_bit_exact(shape, sparsity, dtype):
    t = _sparse(shape, sparsity, dtype)
    stored, manifest = encode_state({"w": t, "b": torch.ones(3)})
    back = decode_state(stored, manifest)
    assert set(back) == {"w", "b"}
    assert back["w"].dtype == dtype and back["w"].shape == t.shape
    assert torch.equal(back["w"], t)
    assert torch.equal(back["b"], torch.ones(3))


def test_special_values_and_negative_zero():
    t = _sparse((4096,), 0.95)
    t[:4] = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0])
    back = decode_state(*encode_state({"w": t}))["w"]
    bits = t.view(torch.int32).clone()
    bits[t == 0] = 0  # -0.0 is a zero: it comes back as +0.0
    assert torch.equal(back.view(torch.int32), bits)
    assert not torch.signbit(back[3])


def test_encoding_choice():
    dense, manifest = encode_state({"w": _sparse((256, 256), 0.0)})
    assert "w" in dense and "w" not in manifest["tensors"]
    for sparsity, expected in ((0.5, "bitmask"), (0.9, "relative")):
        stored, manifest = encode_state({"w": _sparse((256, 256), sparsity)})
        entry = manifest["tensors"]["w"]
        assert entry["encoding"] == expected and "w" not in stored
        assert entry["shape"] == [256, 256] and entry["dtype"] == "float32"
        assert entry["nnz"] == int((_sparse((256, 256), sparsity) != 0).sum())


def test_bytes_on_disk_fall_with_sparsity(tmp_path):
    dense_bytes = _file_bytes(tmp_path, {"w": _sparse((1000, 1000), 0.0)}, "dense")
    assert dense_bytes >= 4_000_000
    at90 = _file_bytes(tmp_path, encode_state({"w": _sparse((1000, 1000), 0.9)})[0], "s90")
    at50 = _file_bytes(tmp_path, encode_state({"w": _sparse((1000, 1000), 0.5)})[0], "s50")
    assert at90 <= dense_bytes / 5  # about 0.125: 1 gap byte + 4 value bytes per non-zero
    assert at50 < 0.55 * dense_bytes  # bitmask: 1/32 + 0.5


def test_relative_gaps_over_255_use_fillers():
    # 2000 non-zeros 11 apart, then runs of 255, 256, 511, 512 and 5000 zeros
    t = torch.zeros(30_000)
    pos = list(range(0, 22_000, 11))
    for skip in (255, 256, 511, 512, 5000):
        pos.append(pos[-1] + skip + 1)
    t[pos] = torch.arange(1, len(pos) + 1, dtype=torch.float32)
    stored, manifest = encode_state({"w": t})
    entry = manifest["tensors"]["w"]
    assert (entry["encoding"], entry["index_bits"], entry["nnz"]) == ("relative", 8, len(pos))
    assert entry["entries"] == len(pos) + 0 + 1 + 1 + 2 + 19
    assert stored["w::gaps"].dtype == torch.uint8 and int(stored["w::gaps"].max()) == 255
    assert torch.equal(decode_state(stored, manifest)["w"], t)


def test_relative_uint16_for_very_sparse():
    t = torch.zeros(2_000_000)
    t[torch.arange(7, 2_000_000, 40_000)] = 3.5
    t[-1] = -1.0
    stored, manifest = encode_state({"w": t})
    entry = manifest["tensors"]["w"]
    assert (entry["encoding"], entry["index_bits"]) == ("relative", 16)
    assert stored["w::gaps"].dtype == torch.uint16
    assert torch.equal(decode_state(stored, manifest)["w"], t)


def test_integer_bool_and_small_tensors_stay_dense():
    ints = torch.zeros(5000, dtype=torch.int64)
    flags = torch.zeros(5000, dtype=torch.bool)
    small = torch.zeros(1000)
    stored, manifest = encode({"i": ints, "f": flags, "s": small})
    assert manifest["tensors"] == {}
    assert stored["i"] is ints and stored["f"] is flags and stored["s"] is small
    assert decode(stored, manifest)["i"] is ints


def _corrupt(what):
    t = _sparse((64, 64), 0.5)
    u = _sparse((64, 64), 0.95)
    stored, manifest = encode_state({"layer.w": t, "layer.u": u})
    assert manifest["tensors"]["layer.w"]["encoding"] == "bitmask"
    assert manifest["tensors"]["layer.u"]["encoding"] == "relative"
    w, u = manifest["tensors"]["layer.w"], manifest["tensors"]["layer.u"]
    if what == "missing values":
        del stored["layer.w::values"]
    elif what == "missing mask":
        del stored["layer.w::mask"]
    elif what == "shape":
        w["shape"] = [64, 65]
    elif what == "nnz":
        w["nnz"] += 1
    elif what == "encoding":
        w["encoding"] = "zstd"
    elif what == "dtype":
        w["dtype"] = "float16"
    elif what == "relative nnz":
        u["nnz"] -= 1
    elif what == "gaps overrun":
        stored["layer.u::gaps"] = torch.full_like(stored["layer.u::gaps"], 255)
    elif what == "missing gaps":
        del stored["layer.u::gaps"]
    return stored, manifest


@pytest.mark.parametrize("what, name", [
    ("missing values", "layer.w"), ("missing mask", "layer.w"), ("shape", "layer.w"),
    ("nnz", "layer.w"), ("encoding", "layer.w"), ("dtype", "layer.w"),
    ("relative nnz", "layer.u"), ("gaps overrun", "layer.u"), ("missing gaps", "layer.u")])
def test_decode_errors_name_the_tensor(what, name):
    stored, manifest = _corrupt(what)
    with pytest.raises(ValueError, match=re.escape(name)):
        decode_state(stored, manifest)


def _pruned(model, amount=0.9):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
                flat = m.weight.view(-1)
                flat[flat.abs().argsort()[:int(amount * flat.numel())]] = 0
    return model


def test_pruned_model_artifact_is_smaller_and_exact(tmp_path):
    # TINY["cnn"] is widened: its own convolutions are all below sparse.MIN_ELEMENTS.
    spec = {"arch": TINY["cnn"]["arch"], "config": {**TINY["cnn"]["config"], "widths": [8, 16, 32]}}
    x = tiny_inputs("cnn")
    folders = {}
    for label in ("dense", "sparse"):
        torch.manual_seed(0)
        model = build(spec).eval()
        if label == "sparse":
            _pruned(model)
        folders[label] = artifact.save(ModelState.from_module(model, spec), tmp_path / label,
                                       task={"name": "t"}, examples=x, input_names=("pixels",))
    dense, sparse = (artifact.size_bytes(folders[k]) for k in ("dense", "sparse"))
    assert sparse < 0.4 * dense
    back = artifact.load(folders["sparse"]).torch_model
    with torch.inference_mode():
        assert torch.equal(back(*x), model(*x))
    own, loaded = model.state_dict(), back.state_dict()
    assert own.keys() == loaded.keys()
    assert all(torch.equal(own[k], loaded[k]) and own[k].dtype == loaded[k].dtype for k in own)
