import pytest
import torch
from torch import nn

from slimcart import artifact
from slimcart.errors import ModelError, UsageError
from slimcart.models import build
from slimcart.models.reshape import apply_reshape
from slimcart.prune.structured import ChannelPruneConfig, HeadPruneConfig, channel_prune, head_prune
from slimcart.registry import techniques
from slimcart.stage import ModelState, StageContext
from tests.tiny import TINY, tiny, tiny_inputs

NAMES = {"cnn": ("image",), "deepfm": ("sparse", "dense"), "text": ("input_ids", "attention_mask")}


class FakeTask:
    """Just what the pruning stages use: example inputs, a loss and a few labelled batches."""

    def __init__(self, name: str):
        self.name, self.input_names = name, NAMES[name]

    def example_inputs(self, batch: int, split: str = "test"):
        return tiny_inputs(self.name, batch)

    def loss(self, outputs, labels):
        return nn.functional.cross_entropy(outputs, labels)

    def batches(self, split, batch_size, *, shuffle=False, seed=0, limit=None):
        for i in range(3):
            yield tiny_inputs(self.name, 8, seed=10 + i), torch.randint(0, 3, (8,))


def run(name: str, technique, **cfg):
    model = tiny(name)
    state = ModelState.from_module(model, TINY[name])
    cls = ChannelPruneConfig if technique is channel_prune else HeadPruneConfig
    report = technique(state, cls(**cfg), StageContext(task=FakeTask(name), workdir=None, progress=False))
    return state, report


def outs(model, name):
    with torch.no_grad():
        return model.eval()(*tiny_inputs(name, 6))


def test_techniques_are_registered():
    assert {"channel_prune", "head_prune"} <= set(techniques())


def test_cnn_channels_hit_the_target_and_residuals_stay_consistent():
    ref = tiny("cnn")
    state, rep = run("cnn", channel_prune, ratio=0.5)
    m = state.torch_model
    for name, conv in m.named_modules():
        if isinstance(conv, nn.Conv2d):
            assert abs(conv.out_channels - ref.get_submodule(name).out_channels / 2) <= 1, name
    blocks = m.layers
    assert blocks[0].conv2.out_channels == m.stem[0].out_channels          # identity shortcut
    assert blocks[1].conv2.out_channels == blocks[1].shortcut[0].out_channels
    assert blocks[2].conv1.in_channels == blocks[1].conv2.out_channels == blocks[2].shortcut[0].in_channels
    assert all(b.bn2.num_features == b.conv2.out_channels for b in blocks)
    assert m.fc.in_features == blocks[2].conv2.out_channels and m.fc.out_features == 5
    assert "output layer" in rep.skipped["fc"]
    assert rep.changed["layers.1.conv1"].startswith("out_channels 8 -> 4")
    s = rep.stats
    assert s["params_after"] < s["params_before"] and s["macs_after"] < s["macs_before"]
    assert s["params_after"] == sum(p.numel() for p in m.parameters())
    assert 0 < s["mac_reduction"] < 1 and outs(m, "cnn").shape == outs(ref, "cnn").shape


def test_magnitude_channels_match_torch_pruning_own_pruner():
    """With magnitude importance, the adapter keeps exactly the channels that Torch-Pruning's own
    MagnitudePruner keeps at the same ratio (the benchmark compares the two at the same MACs)."""
    import torch_pruning as tp

    ref = tiny("cnn").eval()
    example = tiny_inputs("cnn", 2)
    pruner = tp.pruner.MagnitudePruner(ref, example, importance=tp.importance.MagnitudeImportance(p=2),
                                       pruning_ratio=0.5, ignored_layers=[ref.fc], forward_fn=lambda m, x: m(*x))
    pruner.step()
    state, _ = run("cnn", channel_prune, ratio=0.5, importance="magnitude")
    ours = dict(state.torch_model.named_parameters())
    for name, p in ref.named_parameters():
        assert torch.equal(ours[name], p), name


def test_round_to_iterative_taylor_and_global_pruning_run(tmp_path):
    state, rep = run("cnn", channel_prune, ratio=0.3, round_to=2)
    convs = [c for c in state.torch_model.modules() if isinstance(c, nn.Conv2d)]
    assert all(c.out_channels % 2 == 0 for c in convs) and rep.stats["params_after"] < rep.stats["params_before"]
    state, rep = run("cnn", channel_prune, ratio=0.5, iterative_steps=2, importance="taylor")
    assert state.torch_model.layers[1].conv1.out_channels == 4
    state, rep = run("cnn", channel_prune, ratio=0.5, importance="taylor", global_pruning=True)
    assert rep.stats["mac_reduction"] > 0.3 and outs(state.torch_model, "cnn").shape == (6, 5)


def save_and_load(state, name, tmp_path):
    folder = artifact.save(state, tmp_path / "m", task={"name": "t"}, examples=tiny_inputs(name, 2),
                           input_names=NAMES[name])
    return artifact.load(folder).torch_model


@pytest.mark.parametrize("name", ["cnn", "deepfm"])
def test_pruned_model_saves_and_reloads_identically(name, tmp_path):
    state, rep = run(name, channel_prune, ratio=0.5)
    assert state.spec["reshape"]["modules"] and "reshape" not in TINY[name]
    loaded = save_and_load(state, name, tmp_path)
    assert torch.equal(outs(loaded, name), outs(state.torch_model, name))


def test_deepfm_on_real_data_with_taylor_and_finetuning(ctr_task):
    model, spec = ctr_task.build_baseline()
    state = ModelState.from_module(model, spec)
    cfg = ChannelPruneConfig(ratio=0.5, importance="taylor", taylor_batches=2, finetune_epochs=0.03)
    rep = channel_prune(state, cfg, StageContext(task=ctr_task, workdir=None, progress=False))
    mlp = state.torch_model.mlp
    assert (mlp[0].out_features, mlp[2].out_features, mlp[4].out_features) == (128, 64, 1)
    assert rep.skipped["mlp.4"].startswith("output layer") and "dense_linear" in rep.skipped
    assert rep.stats["finetune"]["steps"] >= 1 and "auc" in str(rep.stats["val_after_finetune"]).lower()
    assert set(rep.stats) >= {"val_before", "val_after_prune", "param_reduction", "mac_reduction"}
    rebuilt = build(state.spec)
    rebuilt.load_state_dict(state.torch_model.state_dict())


def test_head_prune_removes_heads_and_ffn_and_exports_to_onnx(tmp_path):
    from slimcart.accelerate.onnx_export import export_onnx, parity

    ref = tiny("text")
    state, rep = run("text", head_prune, heads_ratio=0.5, ffn_ratio=0.5)
    m = state.torch_model
    for layer in m.encoder.encoder.layer:
        att = layer.attention.self
        assert att.num_attention_heads == 2 and att.query.out_features == att.value.out_features == 16
        assert layer.attention.output.dense.in_features == 16 and layer.intermediate.dense.out_features == 32
        assert layer.output.dense.out_features == 32  # hidden size kept
    assert rep.changed["encoder.encoder.layer.0.attention.self"].startswith("heads 4 -> 2")
    assert rep.changed["encoder.encoder.layer.1.intermediate.dense"] == "ffn 64 -> 32"
    assert rep.stats["heads_after"] == 4 and rep.stats["params_after"] < rep.stats["params_before"]
    assert rep.stats["macs_after"] < rep.stats["macs_before"] and "head" in rep.skipped
    assert outs(m, "text").shape == outs(ref, "text").shape
    path = export_onnx(m, tiny_inputs("text", 2), tmp_path / "m.onnx", NAMES["text"],
                       {n: {0: "batch", 1: "seq"} for n in NAMES["text"]})
    assert parity(m, path, tiny_inputs("text", 6), NAMES["text"])["max_abs_error"] < 1e-4
    loaded = save_and_load(state, "text", tmp_path)
    assert torch.allclose(outs(loaded, "text"), outs(m, "text"), atol=1e-6)


def test_head_prune_taylor_global_and_exclusions():
    state, rep = run("text", head_prune, heads_ratio=0.5, ffn_ratio=0.25, importance="taylor",
                     global_pruning=True, round_to=8, exclude=["encoder.encoder.layer.0.*"])
    layers = state.torch_model.encoder.encoder.layer
    assert layers[0].attention.self.num_attention_heads == 4 and layers[0].intermediate.dense.out_features == 64
    assert layers[1].attention.self.num_attention_heads < 4 and layers[1].intermediate.dense.out_features % 8 == 0
    assert "excluded by pattern" in rep.skipped["encoder.encoder.layer.0.attention.self"]


def test_misuse_is_refused_with_clear_errors():
    for bad in (1.0, -0.1):
        with pytest.raises(ValueError):
            ChannelPruneConfig(ratio=bad)
        with pytest.raises(ValueError):
            HeadPruneConfig(heads_ratio=bad)
    with pytest.raises(ValueError):
        ChannelPruneConfig(ratio=0.5, importance="random")
    with pytest.raises(ValueError, match="heads_ratio and/or ffn_ratio"):
        HeadPruneConfig()
    with pytest.raises(UsageError, match="'nothing.\\*'"):
        run("cnn", channel_prune, ratio=0.5, exclude=["nothing.*"])
    with pytest.raises(UsageError, match="head_prune"):
        run("text", channel_prune, ratio=0.5)
    with pytest.raises(UsageError, match="channel_prune"):
        run("cnn", head_prune, heads_ratio=0.5)


def test_exclude_keeps_the_layer_and_says_why():
    state, rep = run("cnn", channel_prune, ratio=0.5, exclude=["layers.2.conv1"])
    assert state.torch_model.layers[2].conv1.out_channels == 8
    assert rep.skipped["layers.2.conv1"] == "excluded by pattern 'layers.2.conv1'"


class NumpyBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)

    def forward(self, x):
        return torch.from_numpy(self.conv(x).numpy())  # breaks autograd tracing


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.block, self.fc = NumpyBlock(), nn.Linear(4, 5)

    def forward(self, x):
        return self.fc(self.block(x).mean((2, 3)))


def test_untraceable_model_names_the_layer():
    state = ModelState.from_module(Untraceable(), {"arch": "custom"})
    with pytest.raises(ModelError, match="layer 'block"):
        channel_prune(state, ChannelPruneConfig(ratio=0.5), StageContext(task=FakeTask("cnn"), workdir=None))


def test_apply_reshape_names_a_missing_layer():
    record = {"version": 1, "modules": {"layers.9.conv1": {"type": "Conv2d", "in": 2, "out": 2}}}
    with pytest.raises(ModelError, match="layers.9.conv1"):
        apply_reshape(build(TINY["cnn"]), record)
