"""k-means weight sharing: at most 2**bits values per layer, zeros kept, centroids fine-tuned
while the weights stay tied to them, and clear errors for bad settings."""
import copy
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from slimcart import registry
from slimcart.errors import UsageError
from slimcart.models import build
from slimcart.prune.magnitude import MagnitudePruneConfig, magnitude_prune
from slimcart.quantize.kmeans import WeightSharingConfig, kmeans_1d, linear_init, weight_sharing
from slimcart.recipe import Recipe, shipped_recipes, technique_name
from slimcart.stage import ModelState, StageContext
from slimcart.tasks.base import Split, Task, TrainConfig
from slimcart.tasks.common import ClassificationMixin
from tests.tiny import TINY, tiny

MLP_SPEC = {"arch": "mlp", "config": {"in_shape": [1, 16, 16], "hidden": [48, 24], "num_classes": 5}}


@dataclass
class TinyImages(ClassificationMixin, Task):
    """Random 16x16 images labelled by a fixed random linear map: learnable in a few steps."""

    name = "tiny_images"
    metric_names = ("accuracy", "macro_f1")
    primary_metric = "accuracy"
    input_names = ("pixels",)

    @classmethod
    def make(cls) -> "TinyImages":
        g = torch.Generator().manual_seed(0)
        proj = torch.randn(256, 5, generator=g)

        def split(n):
            x = torch.randn(n, 1, 16, 16, generator=g)
            return Split((x,), (x.flatten(1) @ proj).argmax(1))

        return cls(dataset="random", splits={"train": split(256), "val": split(64), "test": split(64)})

    def build_baseline(self, seed: int = 0):
        return build(MLP_SPEC), MLP_SPEC

    def train_config(self, budget: str = "full") -> TrainConfig:
        return TrainConfig(epochs=1, batch_size=32, lr=1e-2)


def _mlp(seed=0):
    torch.manual_seed(seed)
    return build(MLP_SPEC).eval()


def _ctx(tmp_path, task=None):
    return StageContext(task=task, workdir=tmp_path, progress=False)


def _share(model, tmp_path, task=None, **cfg):
    state = ModelState.from_module(model, {})
    return weight_sharing(state, WeightSharingConfig(**cfg), _ctx(tmp_path, task))


def _prune(model, tmp_path, sparsity=0.6, **cfg):
    magnitude_prune(ModelState.from_module(model, {}), MagnitudePruneConfig(sparsity=sparsity, **cfg),
                    _ctx(tmp_path))
    return {n: m.weight.detach().clone() for n, m in model.named_modules()
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}


def test_registered_and_recipe_is_valid():
    assert "weight_sharing" in registry.techniques()
    stages = Recipe.load(shipped_recipes()["product_image/deep-compression"]).stages
    names = [technique_name(s) for s in stages]
    assert "gradual_prune" in names and names[-1] == "weight_sharing"
    assert stages[-1].train.epochs > 0


def test_linear_init_spans_min_max_and_kmeans_finds_clusters():
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.normal(c, 0.01, 500) for c in (-1.0, 0.2, 0.9)])
    init = linear_init(values, 8)
    assert init[0] == values.min() and init[-1] == values.max() and np.all(np.diff(init) > 0)
    start, _ = kmeans_1d(values, 8, iterations=0)
    assert np.array_equal(start, init)
    centroids, idx = kmeans_1d(values, 3, iterations=50)
    assert np.allclose(np.sort(centroids), [-1.0, 0.2, 0.9], atol=0.01)
    assert np.all(np.diff(centroids) > 0)
    assert np.array_equal(idx, np.repeat([0, 1, 2], 500))
    few = np.array([0.5, -1.0, 0.5, 2.0])  # no more distinct values than centroids: kept exactly
    centroids, idx = kmeans_1d(few, 4, iterations=30)
    assert np.array_equal(centroids[idx], few) and len(centroids) == 3


@pytest.mark.parametrize("name", ["cnn", "mlp"])
def test_at_most_2_to_bits_values_and_zeros_preserved(name, tmp_path):
    model = tiny("cnn") if name == "cnn" else _mlp()
    before = _prune(model, tmp_path)
    rep = _share(model, tmp_path, bits=3)
    assert set(rep.changed) == set(before)
    for n, m in model.named_modules():
        if n not in before:
            continue
        w = m.weight.detach()
        assert torch.equal(w == 0, before[n] == 0), n  # pruned zeros stay zero, no new zero appears
        assert torch.unique(w[w != 0]).numel() <= 8
        assert rep.stats["bits"][n] == 3 and rep.stats["unique_values"][n] <= 8
        assert "8 centroids (3 bits)" in rep.changed[n] and "rel. error" in rep.changed[n]
    if name == "cnn":
        assert rep.changed["layers.1.conv2"].startswith("Conv 3x3 8->8: 8 centroids")
        assert rep.skipped == {}


def test_sqnr_grows_with_bits(tmp_path):
    sqnr = []
    for bits in (2, 4, 6, 8):
        rep = _share(_mlp(), tmp_path, bits=bits)
        sqnr.append(rep.stats["sqnr_db"]["hidden.0"])
        assert rep.stats["per_layer"]["hidden.0"]["unique_values"] <= 2 ** bits
    assert sqnr == sorted(sqnr) and sqnr[-1] - sqnr[0] > 20


def test_layer_bits_layers_and_exclude(tmp_path):
    model = _mlp()
    head = model.head.weight.detach().clone()
    rep = _share(model, tmp_path, bits=6, layer_bits={"hidden.1": 2}, exclude=["head"])
    assert rep.stats["bits"] == {"hidden.0": 6, "hidden.1": 2}
    assert torch.unique(model.hidden[1].weight).numel() <= 4
    assert torch.equal(model.head.weight, head)
    assert rep.skipped["head"] == "excluded by pattern"
    rep = _share(_mlp(), tmp_path, layers=["hidden.*"])
    assert set(rep.changed) == {"hidden.0", "hidden.1"} and rep.skipped["head"] == "not matched by layers"


def test_fine_tuning_moves_centroids_and_keeps_the_tie(tmp_path):
    task = TinyImages.make()
    model = _mlp()
    before = _prune(model, tmp_path, sparsity=0.5)
    plain = copy.deepcopy(model)
    _share(plain, tmp_path, bits=3, exclude=["head"])
    rep = _share(model, tmp_path, task=task, bits=3, exclude=["head"], train={"epochs": 2, "lr": 0.01})
    assert rep.stats["train_steps"] == 16 and "val_after" in rep.stats and "val_after_clustering" in rep.stats
    for n in ("hidden.0", "hidden.1"):
        w, w0 = model.get_submodule(n).weight.detach(), plain.get_submodule(n).weight.detach()
        assert not torch.equal(w, w0)                                   # the centroids moved
        assert rep.stats["per_layer"][n]["centroid_shift"] > 0
        assert torch.equal(w == 0, before[n] == 0)                     # zeros kept, none added
        assert torch.unique(w[w != 0]).numel() <= 8                   # still tied: <= 2**bits values
        # the weights that shared a centroid before fine-tuning still share one
        for v in torch.unique(w0[w0 != 0]):
            assert torch.unique(w[w0 == v]).numel() == 1
        assert model.get_submodule(n).weight.requires_grad
        assert not hasattr(model.get_submodule(n), "parametrizations")
    # the excluded, pruned head was trained with its zeros held
    head = model.head.weight.detach()
    assert torch.equal(head == 0, before["head"] == 0) and not torch.equal(head, before["head"])


def test_bad_bits_and_patterns_are_rejected(tmp_path):
    for bad in ({"bits": 1}, {"bits": 9}, {"layer_bits": {"head": 9}}, {"iterations": -1},
                {"train": {"epochs": -1}}, {"train": {"epochs": 1, "lr": 0}}, {"unknown": 1}):
        with pytest.raises(ValidationError):
            WeightSharingConfig(**bad)
    for key, value in (("layers", ["nothing.*"]), ("exclude", ["nope"]), ("layer_bits", {"fc9": 4})):
        with pytest.raises(UsageError, match=f"weight_sharing.{key}: pattern"):
            _share(_mlp(), tmp_path, **{key: value})
    with pytest.raises(UsageError, match="no layer selected"):
        _share(_mlp(), tmp_path, layer_types=["Conv2d"])
    with pytest.raises(UsageError, match="needs a task"):
        _share(_mlp(), tmp_path, train={"epochs": 1})


def test_all_zero_layer_is_skipped_with_reason(tmp_path):
    model = _mlp()
    with torch.no_grad():
        model.head.weight.zero_()
    rep = _share(model, tmp_path)
    assert rep.skipped["head"] == "every weight is zero" and "head" not in rep.changed
    assert TINY  # the tiny CNN is exercised above


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_centroids_are_rounded_to_float16_unless_asked(dtype, tmp_path):
    model = _mlp()
    _prune(model, tmp_path)
    exact = copy.deepcopy(model)
    _share(model, tmp_path, bits=4, centroid_dtype=dtype)
    _share(exact, tmp_path, bits=4, centroid_dtype="float32")
    for (n, m), (_, e) in zip(model.named_modules(), exact.named_modules()):
        if not isinstance(m, torch.nn.Linear):
            continue
        w, ref = m.weight.detach(), e.weight.detach()
        in_half = torch.equal(w.half().float(), w)
        assert in_half if dtype == "float16" else torch.equal(w, ref), n
        assert torch.allclose(w, ref, rtol=2 ** -10, atol=0)
