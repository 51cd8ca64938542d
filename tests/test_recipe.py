import pytest
import yaml

from slimcart import RecipeError, UsageError
from slimcart.prune.magnitude import MagnitudePruneConfig
from slimcart.quantize.dynamic import Int8DynamicConfig
from slimcart.recipe import MeasureConfig, Recipe, resolve, shipped_recipes


def test_every_problem_is_reported_at_once_with_its_key_path():
    raw = {"version": 1, "stagse": [], "stages": [
        {"type": "magnitude_prun", "sparsity": 0.5},
        {"type": "magnitude_prune", "sparsity": 1.5, "colour": "red"},
        {"type": "onnx_export", "opset": "seventeen"},
    ], "measure": {"batch_sizes": [0, 8], "rounds": 5}}
    with pytest.raises(RecipeError) as info:
        Recipe.from_dict(raw, source="bad.yaml")
    problems = info.value.problems
    text = "\n".join(problems)
    assert len(problems) == 7, text
    assert "stagse: unknown key. Did you mean: stages?" in text
    assert "stages[0].type: unknown technique 'magnitude_prun'. Did you mean: magnitude_prune" in text
    assert "stages[1].sparsity: Input should be less than 1" in text
    assert "stages[1].colour: unknown key" in text
    assert "stages[2].opset:" in text
    assert "measure.batch_sizes[0]:" in text
    assert "measure.rounds:" in text
    assert "bad.yaml" in str(info.value)


def test_stage_order_is_checked_before_running():
    with pytest.raises(RecipeError, match=r"stages\[1\] \(int8_dynamic\): needs a torch model but gets a onnx"):
        Recipe.from_dict({"stages": [{"type": "onnx_export"}, {"type": "int8_dynamic"}]})
    with pytest.raises(RecipeError, match=r"stages\[0\] \(ort_int8_dynamic\): needs a onnx model"):
        Recipe.from_dict({"stages": [{"type": "ort_int8_dynamic"}]})
    with pytest.raises(RecipeError, match="onnx_export.*needs a torch model but gets a torch_int8"):
        Recipe([Int8DynamicConfig(), __import__("slimcart.accelerate.onnx_export", fromlist=["x"]).OnnxExportConfig()])


def test_exactly_one_of_sparsity_or_threshold():
    with pytest.raises(RecipeError, match="exactly one of sparsity"):
        Recipe.from_dict({"stages": [{"type": "magnitude_prune"}]})
    with pytest.raises(RecipeError, match="exactly one of sparsity"):
        Recipe.from_dict({"stages": [{"type": "magnitude_prune", "sparsity": 0.5, "threshold": 0.1}]})
    with pytest.raises(RecipeError, match="greater than or equal to 0"):
        Recipe.from_dict({"stages": [{"type": "magnitude_prune", "sparsity": -0.1}]})


def test_python_objects_and_yaml_build_the_same_recipe(tmp_path):
    py = Recipe([MagnitudePruneConfig(sparsity=0.25, scope="global"), Int8DynamicConfig(per_channel=False)],
                MeasureConfig(batch_sizes=[1, 8]), name="mine")
    path = tmp_path / "mine.yaml"
    path.write_text(py.to_yaml())
    back = Recipe.load(path)
    assert back.to_dict() == py.to_dict()
    assert back.final_format() == "torch_int8"
    assert yaml.safe_load(path.read_text())["stages"][0]["type"] == "magnitude_prune"


def test_shipped_recipes_are_valid_and_resolvable():
    shipped = shipped_recipes()
    assert {"intent/onnx-int8", "product_image/onnx", "ctr/onnx-int8"} <= set(shipped)
    for key in shipped:
        assert resolve(key).stages


def test_unknown_recipe_and_non_mapping_yaml(tmp_path):
    with pytest.raises(UsageError, match="neither a file nor a shipped recipe. Did you mean: ctr/onnx-int8"):
        resolve("ctr/onnx-int9")
    bad = tmp_path / "list.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(RecipeError, match="must be a mapping"):
        Recipe.load(bad)
    broken = tmp_path / "broken.yaml"
    broken.write_text("stages: [\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        Recipe.load(broken)
