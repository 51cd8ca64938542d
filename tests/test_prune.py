import pytest
import torch

from slimcart import UsageError
from slimcart.prune.magnitude import MagnitudePruneConfig, magnitude_prune
from slimcart.stage import ModelState, StageContext
from tests.tiny import TINY, tiny


def _prune(model, **cfg):
    state = ModelState.from_module(model, TINY["cnn"])
    return magnitude_prune(state, MagnitudePruneConfig(**cfg), StageContext(task=None, workdir=None))


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.9])
def test_layerwise_sparsity_is_exact_per_layer(sparsity):
    model = tiny("cnn")
    rep = _prune(model, sparsity=sparsity)
    for name, mod in model.named_modules():
        if isinstance(mod, (torch.nn.Conv2d, torch.nn.Linear)):
            n = mod.weight.numel()
            assert int((mod.weight == 0).sum()) == round(sparsity * n), name
    assert rep.stats["sparsity"] == pytest.approx(sparsity, abs=1e-3)
    assert set(rep.changed) >= {"stem.0", "fc"}


def test_global_sparsity_hits_target_and_keeps_the_largest_weights():
    model = tiny("cnn")
    before = torch.cat([p.detach().abs().flatten() for n, p in model.named_parameters()
                        if n.endswith("weight") and p.ndim > 1])
    rep = _prune(model, sparsity=0.6, scope="global")
    assert rep.stats["pruned_weights"] == round(0.6 * before.numel())
    kept = torch.cat([m.weight.detach().abs().flatten() for m in model.modules()
                      if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))])
    assert kept[kept > 0].min() >= before.kthvalue(round(0.6 * before.numel())).values


def test_threshold_is_the_classic_where():
    model, ref = tiny("cnn"), tiny("cnn")
    _prune(model, threshold=0.05)
    for (n, m), (_, r) in zip(model.named_modules(), ref.named_modules()):
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            expect = torch.where(r.weight.abs() > 0.05, r.weight, torch.zeros_like(r.weight))
            assert torch.equal(m.weight, expect), n


def test_exclusions_are_reported_not_silent():
    model = tiny("cnn")
    rep = _prune(model, sparsity=0.5, exclude=["fc"], layer_types=["Conv2d"])
    assert rep.skipped["fc"] == "Linear not in layer_types"
    assert float((model.fc.weight == 0).float().mean()) < 0.1
    model = tiny("cnn")
    rep = _prune(model, sparsity=0.5, include=["layers.*"])
    assert rep.skipped["stem.0"] == "not matched by include"


def test_pattern_matching_nothing_is_an_error():
    with pytest.raises(UsageError, match="pattern 'encoder.\\*' matches no layer"):
        _prune(tiny("cnn"), sparsity=0.5, include=["encoder.*"])


def test_sparsity_out_of_range_is_rejected():
    for bad in (1.0, 1.5, -0.2):
        with pytest.raises(ValueError):
            MagnitudePruneConfig(sparsity=bad)
