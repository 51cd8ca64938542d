"""Every model source goes through a shipped recipe end to end, with the report: a Hugging Face
classifier folder, a torchvision architecture + safetensors, an ONNX file, a plain nn.Module."""
import json

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import save_file

import slimcart as sc
from slimcart import RecipeError, UsageError
from tests.conftest import run_cli

QUICK = sc.MeasureConfig(batch_sizes=[1, 4], memory=False, deployed=False, throughput_seconds=0.0)


@pytest.fixture(scope="module")
def tickets(tmp_path_factory):
    """A small intent table (3 real bitext intents) and a 2-layer BERT classifier folder saved
    with save_pretrained, with the MiniLM tokenizer files (its own tokenizer, as a user's has)."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from slimcart.models.text_classifier import minilm_dir

    root = tmp_path_factory.mktemp("hf")
    from slimcart.data import paths

    df = pd.read_csv(paths.find(["intent/bitext_customer_support/bitext_intents.csv.gz"], "bitext"))
    keep = sorted(df["intent"].unique())[:3]
    df[df["intent"].isin(keep)].groupby("intent").head(40)[["instruction", "intent"]].to_csv(
        root / "tickets.csv", index=False)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=128, num_labels=3,
                     id2label=dict(enumerate(keep)), label2id={k: i for i, k in enumerate(keep)})
    BertForSequenceClassification(cfg).save_pretrained(root / "hf", safe_serialization=True)
    AutoTokenizer.from_pretrained(str(minilm_dir())).save_pretrained(root / "hf")
    return root


def test_hf_folder_cli_onnx_int8_and_heads50(tickets, tmp_path):
    out = tmp_path / "out"
    r = run_cli("compress", "--task", "intent", "--dataset", str(tickets / "tickets.csv"),
                "--text-column", "instruction", "--label-column", "intent", "--model", str(tickets / "hf"),
                "--recipe", "intent/onnx-int8", "--recipe", "intent/heads50-ft", "--batch-sizes", "1,4",
                "--out", str(out), "--quiet")
    assert r.returncode == 0, r.stderr
    res = json.loads((out / "result.json").read_text())
    assert res["model_source"].startswith("Hugging Face bert classifier")
    by = {v["name"]: v for v in res["variants"]}
    assert by["onnx-int8"]["format"] == "onnx" and by["onnx-int8"]["compression_ratio"] > 2.5
    heads = by["heads50-ft"]["stages"][0]["stats"]
    assert heads["heads_before"] == 8 and heads["heads_after"] == 4
    assert (out / "report.html").is_file() and (out / "baseline" / "tokenizer" / "tokenizer.json").is_file()
    # the compressed HF model is a bundle: it predicts raw text with its own tokenizer
    pred = sc.load_bundle(out / "variants" / "heads50-ft").predict(["I want to cancel my order"])
    assert pred["label"].iloc[0] in {"cancel_order", "change_order", "change_shipping_address"}


def test_hf_folder_python_api(tickets):
    task = sc.load_task("intent", str(tickets / "tickets.csv"), text_column="instruction",
                        label_column="intent", tokenizer=str(tickets / "hf"))
    res = sc.compress(str(tickets / "hf"), task, "intent/onnx-int8", measure=QUICK, progress=False)
    try:
        v = res.result.variants[0]
        assert v.agreement["top1_agreement"] > 0.9 and set(v.latency_ms) == {"onnxruntime"}
    finally:
        res.cleanup()


def _photos(root, rng):
    from PIL import Image

    for split, n in (("train", 16), ("test", 6)):
        for c, color in enumerate([(200, 30, 30), (30, 200, 30), (30, 30, 200)]):
            d = root / split / f"class{c}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                a = np.clip(rng.normal(0, 40, (40, 48, 3)) + np.array(color), 0, 255).astype(np.uint8)
                Image.fromarray(a).save(d / f"{i}.jpg")
    return root


def test_torchvision_resnet18_cli_channel_prune(tmp_path):
    import torchvision

    photos = _photos(tmp_path / "photos", np.random.default_rng(0))
    torch.manual_seed(0)
    save_file(torchvision.models.resnet18(num_classes=3).state_dict(), str(tmp_path / "r18.safetensors"))
    out = tmp_path / "out"
    r = run_cli("compress", "--task", "product_image", "--dataset", str(photos), "--model", "torchvision:resnet18",
                "--weights", str(tmp_path / "r18.safetensors"), "--recipe", "product_image/channel50-ft",
                "--image-size", "32", "--batch-sizes", "1,4", "--out", str(out), "--quiet")
    assert r.returncode == 0, r.stderr
    res = json.loads((out / "result.json").read_text())
    v = res["variants"][0]
    assert res["baseline"]["size_bytes"] > 40e6 and v["compression_ratio"] > 3.0
    assert v["stages"][0]["stats"]["mac_reduction"] > 0.6
    spec = json.loads((out / v["artifact"] / "slimcart.json").read_text())["model"]
    assert spec["arch"] == "torchvision" and spec["config"]["name"] == "resnet18" and spec["reshape"]["modules"]
    # served artifacts are saved: ONNX Runtime's size is the size of the ONNX file it ran
    assert (out / v["served"]["onnxruntime"] / "model.onnx").is_file()
    # an image file in a fresh process, no dataset: the same label as the bundle in this process
    img = next((photos / "test" / "class1").glob("*.jpg"))
    p = run_cli("predict", str(out / v["artifact"]), "--input", str(img), env={"SLIMCART_DATA_DIR": str(tmp_path)})
    assert p.returncode == 0, p.stderr
    assert sc.load_bundle(out / v["artifact"]).predict([str(img)])["label"].iloc[0] in p.stdout


def test_onnx_file_python_and_torch_stages_refused(ctr_task, tmp_path):
    from slimcart.accelerate.onnx_export import export_onnx

    model, _ = ctr_task.build_baseline()
    path = export_onnx(model, ctr_task.example_inputs(2, "val"), tmp_path / "user.onnx",
                       ctr_task.input_names, ctr_task.dynamic_axes())
    with pytest.raises(RecipeError, match=r"magnitude_prune.*needs a torch model.*ONNX file"):
        sc.compress(str(path), ctr_task, "ctr/prune-threshold", measure=QUICK, progress=False)
    res = sc.compress(str(path), ctr_task, "ctr/ort-int8", measure=QUICK, progress=False)
    try:
        assert res.result.baseline.format == "onnx" and res.result.variants[0].compression_ratio > 2.0
        assert res.result.variants[0].agreement["max_abs_prob_diff"] < 0.05
        res.save(tmp_path / "out")
        assert (tmp_path / "out" / "report.md").is_file()
    finally:
        res.cleanup()


class UserNet(torch.nn.Module):
    """A user's own CTR model: not registered with slimcart."""

    def __init__(self, vocab: list[int]):
        super().__init__()
        self.emb = torch.nn.ModuleList(torch.nn.Embedding(v, 8) for v in vocab)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(8 * len(vocab) + 1, 64), torch.nn.ReLU(),
                                       torch.nn.Linear(64, 1))

    def forward(self, sparse, dense):
        x = torch.cat([e(sparse[:, i]) for i, e in enumerate(self.emb)] + [dense], 1)
        return self.mlp(x).squeeze(1)


def test_plain_module_python_channel_prune(ctr_task, tmp_path):
    torch.manual_seed(0)
    net = UserNet(ctr_task.info["vocab_sizes"])
    res = sc.compress(net, ctr_task, "ctr/mlp50-ft", measure=QUICK, progress=False)
    try:
        v = res.result.variants[0]
        assert v.stages[0]["stats"]["macs_after"] < v.stages[0]["stats"]["macs_before"]
        assert res.result.baseline.size_bytes > v.size_bytes
        assert v.metrics["auc"] > 0.5
        res.save(tmp_path / "out")
    finally:
        res.cleanup()
    # in a new process the class cannot be rebuilt without running the user's code: clear error
    r = run_cli("bench", str(tmp_path / "out" / "variants" / "mlp50-ft"), "--batch-sizes", "1", "--rounds", "5")
    assert r.returncode == 2 and "cannot rebuild" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("bench", str(tmp_path / "out" / "variants" / "mlp50-ft" / "served" / "onnxruntime"),
                "--batch-sizes", "1", "--rounds", "5")
    assert r.returncode == 0, r.stderr


def test_module_that_does_not_fit_the_task(ctr_task):
    with pytest.raises(UsageError, match="fails on the example inputs"):
        sc.compress(torch.nn.Linear(3, 1), ctr_task, "ctr/prune-threshold", measure=QUICK, progress=False)


def test_compress_refuses_a_model_trained_on_another_split(tmp_path):
    m = tmp_path / "m"
    r = run_cli("train", "--task", "ctr", "--dataset", "womens-reviews", "--budget", "demo", "--out", str(m), "--quiet")
    assert r.returncode == 0, r.stderr
    assert not (tmp_path / ".m.checkpoint").exists()          # the resume checkpoint is gone once saved
    data = json.loads((m / "slimcart.json").read_text())["data"]
    assert data["split_seed"] == 0 and len(data["fingerprint"]) == 64
    for args, why in ((["--seed", "1"], "seed 1: its test rows would overlap"),
                      (["--dataset", "online-shoppers"], "this run uses online-shoppers")):
        r = run_cli("compress", "--task", "ctr", "--model", str(m), "--recipe", "ctr/prune-threshold",
                    "--out", str(tmp_path / "out"), *(["--dataset", "womens-reviews"] if "--dataset" not in args else []),
                    *args, "--quiet")
        assert r.returncode == 2 and why in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert not (tmp_path / "out").exists()
