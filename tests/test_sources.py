"""Model sources: Hugging Face folders, torchvision/timm + safetensors, ONNX files, nn.Modules."""
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from slimcart.errors import ModelError, UsageError
from slimcart.models import build
from slimcart.models.zoo import load_strict, load_zoo
from slimcart.sources import check_onnx_inputs, resolve_source

WORDS = "[PAD] [UNK] [CLS] [SEP] [MASK] where is my order refund cancel the card please help".split()
SIZES = {"bert": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64),
         "distilbert": dict(dim=32, n_layers=2, n_heads=4, hidden_dim=64),
         "roberta": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                         pad_token_id=1)}


def text_inputs(batch=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, len(WORDS), (batch, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0
    return ids, mask


def hf_folder(tmp_path, model_type):
    from transformers import AutoConfig, AutoModelForSequenceClassification, BertTokenizerFast

    torch.manual_seed(0)
    cfg = AutoConfig.for_model(model_type, vocab_size=len(WORDS), max_position_embeddings=40,
                               id2label={0: "order", 1: "refund", 2: "card"}, **SIZES[model_type])
    model = AutoModelForSequenceClassification.from_config(cfg).eval()
    folder = tmp_path / model_type
    model.half().save_pretrained(folder, safe_serialization=True)  # loaded back as float32
    model.float()
    (tmp_path / "vocab.txt").write_text("\n".join(WORDS) + "\n")
    BertTokenizerFast(vocab_file=str(tmp_path / "vocab.txt")).save_pretrained(folder)
    return model, folder


def logits(model, inputs):
    with torch.no_grad():
        out = model.eval()(*inputs)
    return getattr(out, "logits", out)


def rebuilt(model, spec, tmp_path):
    """Save the state dict with safetensors, rebuild from the spec, load it strictly."""
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "w.safetensors"))
    from safetensors.torch import load_file

    again = build(spec)
    load_strict(again, load_file(str(tmp_path / "w.safetensors")), "w.safetensors")
    return again


@pytest.mark.parametrize("model_type", ["bert", "distilbert", "roberta"])
def test_hf_folder_matches_transformers_and_round_trips(tmp_path, model_type):
    ref, folder = hf_folder(tmp_path, model_type)
    src = resolve_source(folder)
    assert (src.kind, src.format, src.spec["arch"]) == ("hf", "torch", "hf_sequence_classification")
    assert src.task_options["tokenizer"] == str(folder)
    assert src.task_options["id2label"] == ["order", "refund", "card"]
    assert src.task_options["max_length"] == (40 - 2 if model_type == "roberta" else 40)
    x = text_inputs()
    out = logits(src.model, x)
    assert isinstance(out, torch.Tensor) and out.shape == (4, 3) and out.dtype == torch.float32
    torch.testing.assert_close(out, logits(ref, x))
    torch.testing.assert_close(logits(rebuilt(src.model, src.spec, tmp_path), x), out)
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(str(folder))("where is my refund")["input_ids"][0] == 2


@pytest.mark.parametrize("model_type", ["bert", "roberta"])
def test_hf_bert_layout_supports_head_prune(tmp_path, model_type):
    from slimcart.prune.structured import HeadPruneConfig, head_prune
    from slimcart.stage import ModelState, StageContext

    class Task:
        input_names = ("input_ids", "attention_mask")

        def example_inputs(self, batch, split="test"):
            return text_inputs(batch)

    src = resolve_source(hf_folder(tmp_path, model_type)[1])
    state = ModelState.from_module(src.model, src.spec)
    rep = head_prune(state, HeadPruneConfig(heads_ratio=0.5, ffn_ratio=0.5),
                     StageContext(task=Task(), workdir=tmp_path, progress=False))
    assert rep.stats["heads_after"] == rep.stats["heads_before"] // 2
    x = text_inputs()
    torch.testing.assert_close(logits(rebuilt(state.torch_model, state.spec, tmp_path), x),
                               logits(state.torch_model, x))


def test_hf_folder_refuses_pickle_and_mismatched_weights(tmp_path):
    ref, folder = hf_folder(tmp_path, "bert")
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    with pytest.raises(ModelError, match="pytorch_model.bin") as err:
        resolve_source(folder)
    assert "safetensors" in str(err.value)
    state = {k: v for k, v in ref.state_dict().items() if not k.startswith("classifier")}
    save_file({**state, "extra.weight": torch.zeros(2)}, str(folder / "model.safetensors"))
    with pytest.raises(ModelError, match=r"missing keys 2: .*classifier.weight.*unexpected keys 1: .*extra"):
        resolve_source(folder)


def zoo_weights(tmp_path, model):
    path = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def test_torchvision_and_timm_with_safetensors(tmp_path):
    import timm
    import torchvision

    x = torch.randn(2, 3, 32, 32)
    torch.manual_seed(0)
    for ref, model in (("torchvision:resnet18", torchvision.models.resnet18(num_classes=3)),
                       ("timm:resnet10t", timm.create_model("resnet10t", num_classes=4, in_chans=1))):
        model.eval()
        if ref.startswith("timm"):
            x = x[:, :1]
        src = resolve_source(ref, weights=zoo_weights(tmp_path, model))
        assert src.kind == "zoo" and src.task_options["channels"] == x.shape[1]
        torch.testing.assert_close(logits(src.model, (x,)), logits(model, (x,)))
        torch.testing.assert_close(logits(rebuilt(src.model, src.spec, tmp_path), (x,)), logits(model, (x,)))
    assert src.spec == {"arch": "timm", "config": {"name": "resnet10t", "num_classes": 4, "in_chans": 1,
                                                   "kwargs": {}}}


def test_zoo_errors(tmp_path):
    import torchvision

    weights = zoo_weights(tmp_path, torchvision.models.resnet18(num_classes=3))
    with pytest.raises(ModelError, match="Did you mean: resnet18"):
        load_zoo("torchvision:resnet181", weights)
    with pytest.raises(ModelError, match=r"missing keys 96: layer1.2.conv1.weight"):
        load_zoo("torchvision:resnet34", weights)
    with pytest.raises(UsageError, match="needs weights"):
        resolve_source("timm:resnet18")


def test_onnx_file_inputs_and_damage(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    path = tmp_path / "m.onnx"
    torch.onnx.export(model.eval(), (torch.randn(1, 3, 16, 16),), str(path), input_names=["pixels"],
                      output_names=["logits"], dynamo=False)
    src = resolve_source(path)
    assert (src.kind, src.format, src.onnx_path, src.input_names, src.output_name) == (
        "onnx", "onnx", path, ("pixels",), "logits")
    assert src.task_options == {"channels": 3, "image_size": 16}
    check_onnx_inputs(src, ("pixels",))
    with pytest.raises(UsageError, match=r"\(pixels\).*\(input_ids, attention_mask\)"):
        check_onnx_inputs(src, ("input_ids", "attention_mask"))
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ModelError, match="bad.onnx"):
        resolve_source(bad)


def test_modules_and_unknown_values(tmp_path):
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    with pytest.raises(UsageError, match="example_inputs"):
        resolve_source(model)
    src = resolve_source(model, example_inputs=torch.randn(2, 3, 2, 2))
    assert src.spec == {"arch": "module", "config": {"class": "torch.nn.modules.container.Sequential"}}
    assert src.model is model and model.training  # the mode is restored

    class Pair(nn.Module):
        def forward(self, x):
            return x, x

    with pytest.raises(UsageError, match="returned a tuple of 2 items"):
        resolve_source(Pair(), example_inputs=(torch.randn(2),))
    (tmp_path / "m.pt").write_bytes(b"")
    with pytest.raises(UsageError, match="pickle"):
        resolve_source(tmp_path / "m.pt")
    with pytest.raises(UsageError, match="Accepted models"):
        resolve_source(tmp_path)
    (tmp_path / "saved").mkdir()
    (tmp_path / "saved" / "slimcart.json").write_text('{"format": "onnx"}')
    assert (resolve_source(tmp_path / "saved").kind, resolve_source(tmp_path / "saved").format) == ("slimcart", "onnx")
