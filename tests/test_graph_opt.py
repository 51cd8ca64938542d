"""Graph optimisation: BatchNorm folding (exact, rebuilds from its spec, composes with pruning,
export and INT8), ONNX Runtime's offline optimisation and its transformer fusions (parity with
eager, fusion statistics, then INT8)."""
import numpy as np
import pytest
import torch
from torch import nn

from slimcart import artifact
from slimcart.accelerate.fold import FoldBnConfig, fold_bn
from slimcart.accelerate.onnx_export import OnnxExportConfig, onnx_export
from slimcart.accelerate.ort_optimize import OrtOptimizeConfig, ort_optimize
from slimcart.accelerate.ort_transformers import OrtTransformerOptimizeConfig, ort_transformer_optimize
from slimcart.errors import ModelError, RecipeError
from slimcart.measure.runtimes import OrtRunner
from slimcart.prune.structured import ChannelPruneConfig, channel_prune
from slimcart.quantize.dynamic import Int8DynamicConfig, int8_dynamic
from slimcart.quantize.ort import OrtInt8DynamicConfig, ort_int8_dynamic
from slimcart.recipe import Recipe, shipped_recipes
from slimcart.stage import ModelState, StageContext
from tests.tiny import TINY, tiny, tiny_inputs

NAMES = {"cnn": ("image",), "text": ("input_ids", "attention_mask"), "zoo": ("image",)}


class FakeTask:
    """What the stages use: example inputs, input names, dynamic axes."""

    def __init__(self, name: str):
        self.name, self.input_names = name, NAMES[name]

    def example_inputs(self, batch: int, split: str = "test"):
        if self.name == "zoo":
            return (torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(1)),)
        return tiny_inputs(self.name, batch)

    def dynamic_axes(self):
        axes = {n: {0: "batch"} | ({1: "seq"} if self.name == "text" else {}) for n in self.input_names}
        return axes | {"logits": {0: "batch"}}


def run(state, technique, cfg, name, tmp_path, i=0):
    return technique(state, cfg, StageContext(FakeTask(name), tmp_path / "work", i, progress=False))


def outs(model, name, batch=6):
    with torch.inference_mode():
        return model.eval()(*FakeTask(name).example_inputs(batch))


def reload(state, name, tmp_path, sub="m"):
    folder = artifact.save(state, tmp_path / sub, task={"name": "t"}, examples=FakeTask(name).example_inputs(2),
                           input_names=NAMES[name])
    return artifact.load(folder)


def bns(model):
    return [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def random_statistics(model):
    """BatchNorm running statistics away from (0, 1), so that folding them changes the weights."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)


def test_fold_bn_is_exact_and_rebuilds_from_its_spec(tmp_path):
    ref = tiny("cnn")
    state = ModelState.from_module(tiny("cnn"), TINY["cnn"])
    rep = run(state, fold_bn, FoldBnConfig(), "cnn", tmp_path)
    m = state.torch_model
    assert bns(m) == [] and rep.stats["pairs_folded"] == len(bns(ref)) == 9
    assert rep.changed["layers.1.shortcut.1"] == "folded into layers.1.shortcut.0"
    assert isinstance(m.stem[1], nn.Identity) and m.stem[0].bias is not None
    assert rep.stats["max_abs_error"] < 1e-5 and "torch.fx" in rep.stats["pairing"]
    assert torch.allclose(outs(m, "cnn"), outs(ref, "cnn"), atol=1e-5, rtol=0)
    assert ["layers.0.conv1", "layers.0.bn1"] in state.spec["bn_folded"]["pairs"] and "bn_folded" not in TINY["cnn"]
    loaded = reload(state, "cnn", tmp_path).torch_model
    assert bns(loaded) == [] and torch.equal(outs(loaded, "cnn"), outs(m, "cnn"))


def test_fold_bn_composes_with_pruning_export_and_int8(tmp_path):
    state = ModelState.from_module(tiny("cnn"), TINY["cnn"])
    run(state, channel_prune, ChannelPruneConfig(ratio=0.5), "cnn", tmp_path, 0)
    pruned = outs(state.torch_model, "cnn")
    rep = run(state, fold_bn, FoldBnConfig(), "cnn", tmp_path, 1)
    assert rep.stats["pairs_folded"] == 9 and "reshape" in state.spec and "bn_folded" in state.spec
    assert torch.allclose(outs(state.torch_model, "cnn"), pruned, atol=1e-5, rtol=0)
    loaded = reload(state, "cnn", tmp_path, "folded").torch_model
    assert torch.equal(outs(loaded, "cnn"), outs(state.torch_model, "cnn"))
    q = ModelState.from_module(loaded, state.spec)  # eager INT8 after folding: saved, rebuilt, reloaded
    run(q, int8_dynamic, Int8DynamicConfig(), "cnn", tmp_path, 2)
    assert torch.equal(outs(reload(q, "cnn", tmp_path, "int8").torch_model, "cnn"), outs(q.torch_model, "cnn"))
    rep = run(state, onnx_export, OnnxExportConfig(), "cnn", tmp_path, 3)
    assert rep.stats["max_abs_error"] < 1e-4
    rep = run(state, ort_int8_dynamic, OrtInt8DynamicConfig(op_types=["Conv", "Gemm"]), "cnn", tmp_path, 4)
    assert any("int8" in v for v in rep.changed.values())


def test_fold_bn_on_torchvision_resnet(tmp_path):
    from slimcart.models.registry import spec
    from slimcart.models.zoo import TorchvisionConfig, build_torchvision

    cfg = TorchvisionConfig(name="resnet18", num_classes=3)
    torch.manual_seed(0)
    model = build_torchvision(cfg).eval()
    random_statistics(model)
    ref = outs(model, "zoo")
    state = ModelState.from_module(model, spec("torchvision", cfg))
    rep = run(state, fold_bn, FoldBnConfig(parity_batch=4), "zoo", tmp_path)
    assert rep.stats["pairs_folded"] == 20 and bns(state.torch_model) == []
    assert torch.allclose(outs(state.torch_model, "zoo"), ref, atol=1e-5, rtol=1e-5)
    assert torch.equal(outs(reload(state, "zoo", tmp_path).torch_model, "zoo"), outs(state.torch_model, "zoo"))


def test_fold_bn_into_tf_same_padding_convolutions(tmp_path):
    """timm's Conv2dSame (the stride-2 convolutions of EfficientNet-Lite) folds like an nn.Conv2d."""
    from slimcart.models import build

    spec = {"arch": "efficientnet_lite0", "config": {"num_classes": 5, "pretrained": False}}
    torch.manual_seed(0)
    model = build(spec).eval()
    random_statistics(model)
    same = [n for n, m in model.named_modules() if type(m).__name__ == "Conv2dSame"]
    assert len(same) == 5  # the stem and four stride-2 depthwise convolutions
    ref, total = outs(model, "zoo"), len(bns(model))
    state = ModelState.from_module(model, spec)
    rep = run(state, fold_bn, FoldBnConfig(parity_batch=4), "zoo", tmp_path)
    assert rep.stats["pairs_folded"] == total and bns(state.torch_model) == [] and not rep.skipped
    assert type(state.torch_model.conv_stem).__name__ == "Conv2dSame" and state.torch_model.conv_stem.bias is not None
    assert torch.allclose(outs(state.torch_model, "zoo"), ref, atol=1e-4, rtol=1e-4)
    assert torch.equal(outs(reload(state, "zoo", tmp_path).torch_model, "zoo"), outs(state.torch_model, "zoo"))


def test_nothing_to_fold_is_a_note_and_a_parity_bound_fails_clearly(tmp_path):
    state = ModelState.from_module(tiny("text"), TINY["text"])
    rep = run(state, fold_bn, FoldBnConfig(), "text", tmp_path)
    assert rep.stats["pairs_folded"] == 0 and rep.notes[0].startswith("nothing to fold")
    assert not rep.changed and "bn_folded" not in state.spec
    state = ModelState.from_module(tiny("cnn"), TINY["cnn"])
    with pytest.raises(ModelError, match="(?s)fold_bn: the folded model disagrees.*max_abs_error"):
        run(state, fold_bn, FoldBnConfig(max_abs_error=1e-12, max_rel_error=1e-12), "cnn", tmp_path)


def test_skipped_batchnorms_say_why(tmp_path):
    class Shared(nn.Module):  # conv output also read by the residual: folding would change it
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4)
            self.pre, self.head = nn.BatchNorm2d(1), nn.Linear(4, 5)

        def forward(self, x):
            y = self.conv(self.pre(x))
            return self.head((self.bn(y) + y).mean((2, 3)))

    model = Shared().eval()
    state = ModelState.from_module(model, {"arch": "module"})
    rep = run(state, fold_bn, FoldBnConfig(), "cnn", tmp_path)
    assert rep.notes[0].startswith("nothing to fold")
    assert rep.skipped == {"pre": "its input is not the output of a Conv/Linear layer",
                           "bn": "the output of conv is also read by something else"}


def test_transformer_fusions_parity_and_int8(tmp_path):
    model = tiny("text")
    state = ModelState.from_module(model, TINY["text"])
    run(state, onnx_export, OnnxExportConfig(), "text", tmp_path, 0)
    rep = run(state, ort_transformer_optimize, OrtTransformerOptimizeConfig(), "text", tmp_path, 1)
    fused = rep.stats["fused_operators"]
    assert fused["Attention"] == 2 and fused["EmbedLayerNormalization"] == 1 and fused["SkipLayerNormalization"] == 4
    assert (rep.stats["num_heads"], rep.stats["hidden_size"]) == (4, 32) and "eager" in rep.stats["reexported"]
    assert rep.stats["parity_reference"] == "eager PyTorch" and rep.stats["max_abs_error"] < 1e-4
    assert rep.stats["nodes_after"] < rep.stats["nodes_before"] and "<attention>" not in rep.skipped
    x = tiny_inputs("text", 5)
    fused_out = OrtRunner(reload(state, "text", tmp_path, "fused").onnx_path, NAMES["text"])(x)
    assert np.abs(fused_out - outs(model, "text", 5).numpy()).max() < 1e-4
    cfg = OrtInt8DynamicConfig(op_types=["MatMul", "Attention", "EmbedLayerNormalization"])
    rep = run(state, ort_int8_dynamic, cfg, "text", tmp_path, 2)
    ops = rep.stats["ops_after"]
    assert ops["QAttention"] == 2 and ops["QEmbedLayerNormalization"] == 1 and ops["MatMulInteger"] >= 4
    assert not [n for n, why in rep.skipped.items() if why.startswith(("Attention", "EmbedLayerNormalization"))]
    got = OrtRunner(reload(state, "text", tmp_path, "int8").onnx_path, NAMES["text"])(x)
    ref = outs(model, "text", 5).numpy()
    assert np.abs(got - ref).max() < 0.05 * np.abs(ref).max() + 1e-3
    with pytest.raises(ModelError, match="before ort_int8_dynamic"):
        run(state, ort_transformer_optimize, OrtTransformerOptimizeConfig(), "text", tmp_path, 3)


def test_head_pruned_encoder_still_fuses(tmp_path):
    from slimcart.prune.structured import HeadPruneConfig, head_prune

    state = ModelState.from_module(tiny("text"), TINY["text"])
    run(state, head_prune, HeadPruneConfig(heads_ratio=0.5), "text", tmp_path, 0)
    run(state, onnx_export, OnnxExportConfig(), "text", tmp_path, 1)
    rep = run(state, ort_transformer_optimize, OrtTransformerOptimizeConfig(), "text", tmp_path, 2)
    assert rep.stats["fused_operators"]["Attention"] == 2 and rep.stats["max_abs_error"] < 1e-4
    assert (rep.stats["num_heads"], rep.stats["hidden_size"]) == (2, 16) and "pruned" in rep.stats["sizes_from"]


def test_no_attention_fusion_is_reported(tmp_path):
    state = ModelState.from_module(tiny("text"), TINY["text"])  # SDPA attention, not re-exported
    run(state, onnx_export, OnnxExportConfig(), "text", tmp_path, 0)
    rep = run(state, ort_transformer_optimize, OrtTransformerOptimizeConfig(eager_attention=False), "text", tmp_path, 1)
    assert "Attention" not in rep.stats["fused_operators"] and rep.notes == ["no Attention fusion happened"]
    assert "no Attention fusion" in rep.skipped["<attention>"] and rep.stats["max_abs_error"] < 1e-4


def test_ort_optimize_levels_and_misuse(tmp_path):
    state = ModelState.from_module(tiny("cnn"), TINY["cnn"])
    run(state, onnx_export, OnnxExportConfig(), "cnn", tmp_path, 0)
    exported = state.onnx_path
    rep = run(state, ort_optimize, OrtOptimizeConfig(level="extended"), "cnn", tmp_path, 1)
    assert rep.changed["FusedConv"].startswith("0 -> ") and rep.stats["max_abs_error"] < 1e-4
    assert rep.stats["optimized_for"] == "CPUExecutionProvider" and not rep.notes
    rep = run(state, ort_optimize, OrtOptimizeConfig(level="all"), "cnn", tmp_path, 2)
    assert "CPUExecutionProvider" in rep.notes[0] and rep.stats["parity_reference"] == "eager PyTorch"
    assert state.onnx_path != exported and reload(state, "cnn", tmp_path).onnx_path.is_file()
    with pytest.raises(ModelError, match="(?s)not a BERT-family transformer.*ort_optimize"):
        run(state, ort_transformer_optimize, OrtTransformerOptimizeConfig(), "cnn", tmp_path, 3)
    with pytest.raises(RecipeError, match=r"stages\[1\]\.level: Input should be 'basic', 'extended' or 'all'"):
        Recipe.from_dict({"stages": [{"type": "onnx_export"}, {"type": "ort_optimize", "level": "max"}]})
    with pytest.raises(RecipeError, match=r"stages\[0\] \(fold_bn\): needs a torch model but gets a onnx"):
        Recipe.from_dict({"input": "onnx", "stages": [{"type": "fold_bn"}]})


def test_recipes_are_shipped():
    shipped = shipped_recipes()
    assert {"product_image/fold-bn", "intent/onnx-fused", "intent/onnx-fused-int8"} <= set(shipped)
    stages = Recipe.load(shipped["intent/onnx-fused-int8"]).stages
    assert [type(s).__name__ for s in stages] == ["OnnxExportConfig", "OrtTransformerOptimizeConfig",
                                                  "OrtInt8DynamicConfig"]


def test_stage_notes_reach_the_variant_notes(ctr_task, ctr_model):
    import slimcart as sc

    res = sc.compress(ctr_model, ctr_task, [sc.Recipe([FoldBnConfig()], name="fold")], progress=False,
                      measure=sc.MeasureConfig(batch_sizes=[1], runtimes=["torch"], memory=False,
                                               deployed=False, throughput_seconds=0.0))
    try:
        v = res.result.variants[0]
        assert any(n.startswith("fold_bn: nothing to fold") for n in v.notes), v.notes
        assert v.stages[0]["notes"][0].startswith("nothing to fold")
    finally:
        res.cleanup()
