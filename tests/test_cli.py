"""Bad input gets one clear paragraph and exit code 2, never a traceback; nothing half-written."""
import gzip
import os
from pathlib import Path

import pytest

from tests.conftest import run_cli


def _assert_clean_error(proc, *needles):
    assert proc.returncode == 2, proc.stderr + proc.stdout
    assert "Traceback" not in proc.stderr
    for n in needles:
        assert n in proc.stderr, proc.stderr


def test_help_shows_examples():
    for args in ([], ["compress"], ["train"], ["bench"], ["validate"], ["tasks"], ["demo"], ["recipes"],
                 ["sensitivity"]):
        proc = run_cli(*args, "--help")
        assert proc.returncode == 0
        assert "Example" in proc.stdout and "slimcart" in proc.stdout


def test_tasks_and_recipes_listing():
    proc = run_cli("tasks")
    assert proc.returncode == 0
    for word in ("intent", "product_image", "ctr", "bitext", "banking77", "womens-reviews", "synthetic"):
        assert word in proc.stdout
    proc = run_cli("recipes")
    assert proc.returncode == 0 and "ctr/onnx-int8" in proc.stdout and "magnitude_prune" in proc.stdout


def test_unknown_task(tmp_path):
    proc = run_cli("compress", "--task", "intnet", "--recipe", "ctr/onnx-int8", "--out", str(tmp_path / "o"))
    _assert_clean_error(proc, "Unknown task 'intnet'", "Did you mean: intent")
    assert not (tmp_path / "o").exists()


def test_unknown_dataset(tmp_path):
    proc = run_cli("train", "--task", "ctr", "--dataset", "womens-review", "--out", str(tmp_path / "o"))
    _assert_clean_error(proc, "Unknown ctr dataset 'womens-review'", "Did you mean: womens-reviews")


def test_unknown_technique_and_wrong_keys(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("stages:\n  - {type: magnitude_prune, sparsty: 0.5}\n  - {type: int8_dynamc}\n")
    proc = run_cli("validate", str(recipe))
    _assert_clean_error(proc, "2 problem(s)", "stages[0].sparsty: unknown key",
                        "unknown technique 'int8_dynamc'. Did you mean: int8_dynamic")
    proc = run_cli("compress", "--task", "ctr", "--recipe", str(recipe), "--out", str(tmp_path / "o"))
    _assert_clean_error(proc, "stages[0].sparsty: unknown key")
    assert not (tmp_path / "o").exists()
    ok = run_cli("validate", "ctr/onnx-int8", "recipes/intent/int8-dynamic.yaml",
                 cwd=Path(__file__).resolve().parent.parent)
    assert ok.returncode == 0 and ok.stdout.count("ok") == 2


def test_missing_data_directory(tmp_path):
    proc = run_cli("train", "--task", "ctr", "--out", str(tmp_path / "o"), "--data-dir", str(tmp_path / "nowhere"))
    _assert_clean_error(proc, "Data directory", "nowhere", "does not exist")
    proc = run_cli("train", "--task", "ctr", "--out", str(tmp_path / "o"),
                   env={"SLIMCART_DATA_DIR": str(tmp_path / "gone")})
    _assert_clean_error(proc, "$SLIMCART_DATA_DIR", "does not exist")


def test_csv_without_the_named_columns(tmp_path):
    csv = tmp_path / "clicks.csv"
    csv.write_text("user,item,clicked\n1,2,0\n2,3,1\n")
    proc = run_cli("train", "--task", "ctr", "--dataset", str(csv), "--categorical", "user,itme",
                   "--label-column", "click", "--out", str(tmp_path / "o"))
    _assert_clean_error(proc, "clicks.csv", "'itme' is not in the file", "Did you mean: item",
                        "'click' is not in the file")
    proc = run_cli("train", "--task", "intent", "--dataset", str(csv), "--text-column", "text",
                   "--label-column", "clicked", "--out", str(tmp_path / "o"))
    _assert_clean_error(proc, "--text-column: column 'text' is not in the file")
    assert not (tmp_path / "o").exists()


def test_an_image_that_is_not_an_image(tmp_path):
    from PIL import Image

    for split in ("train", "test"):
        for cls in ("shoe", "bag"):
            d = tmp_path / "imgs" / split / cls
            d.mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (20, 24), (i * 90, 30, 200)).save(d / f"{i}.png")
    (tmp_path / "imgs" / "train" / "bag" / "broken.jpg").write_bytes(b"not really a jpeg")
    proc = run_cli("train", "--task", "product_image", "--dataset", str(tmp_path / "imgs"),
                   "--out", str(tmp_path / "o"))
    _assert_clean_error(proc, "broken.jpg")
    assert not (tmp_path / "o").exists()


def test_output_directory_that_exists(tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    proc = run_cli("train", "--task", "ctr", "--out", str(out))
    _assert_clean_error(proc, "already exists", "--overwrite")
    assert (out / "keep.txt").read_text() == "mine"


def test_bad_batch_sizes(tmp_path):
    proc = run_cli("compress", "--task", "ctr", "--recipe", "ctr/onnx-int8", "--batch-sizes", "1,x",
                   "--out", str(tmp_path / "o"))
    _assert_clean_error(proc, "--batch-sizes takes comma-separated whole numbers")


def test_train_compress_bench_from_the_command_line(tmp_path):
    """The documented CLI flow, on the shipped online-shoppers data."""
    model = tmp_path / "model"
    proc = run_cli("train", "--task", "ctr", "--dataset", "online-shoppers", "--out", str(model), "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert (model / "model.safetensors").is_file() and (model / "train.json").is_file()
    out = tmp_path / "run"
    proc = run_cli("compress", "--task", "ctr", "--dataset", "online-shoppers", "--model", str(model),
                   "--recipe", "ctr/onnx-int8", "--batch-sizes", "1,8", "--out", str(out), "--quiet")
    assert proc.returncode == 0, proc.stderr
    import json

    result = json.loads((out / "result.json").read_text())
    assert result["baseline"]["metrics"]["auc"] > 0.85  # PageValues makes purchases predictable
    assert set(result["variants"][0]["latency_ms"]["onnxruntime"]) == {"1", "8"}
    proc = run_cli("bench", str(out / "variants" / "onnx-int8"), "--batch-sizes", "1,4")
    assert proc.returncode == 0, proc.stderr
    assert "onnxruntime" in proc.stdout and "p50 ms" in proc.stdout
    proc = run_cli("compress", "--task", "intent", "--model", str(model), "--recipe", "intent/onnx-int8",
                   "--out", str(tmp_path / "x"))
    _assert_clean_error(proc, "was trained for task 'ctr', not 'intent'")


def test_bench_on_a_folder_that_is_not_a_model(tmp_path):
    proc = run_cli("bench", str(tmp_path))
    _assert_clean_error(proc, "is not a slimcart model folder")
    proc = run_cli("train", "--task", "ctr", "--budget", "huge", "--out", str(tmp_path / "o"))
    _assert_clean_error(proc, "--budget must be 'full' or 'demo'")


def test_sensitivity_scan_writes_a_runnable_proposal(tmp_path):
    import json

    import yaml

    from slimcart.recipe import resolve

    model = tmp_path / "model"
    assert run_cli("train", "--task", "ctr", "--dataset", "online-shoppers", "--out", str(model),
                   "--quiet").returncode == 0
    bad = run_cli("sensitivity", "--task", "ctr", "--dataset", "online-shoppers", "--model", str(model),
                  "--sparsities", "0.5,1.5", "--out", str(tmp_path / "bad"))
    _assert_clean_error(bad, "--sparsities must be fractions in (0, 1)")
    bad = run_cli("sensitivity", "--task", "ctr", "--dataset", "online-shoppers", "--model", str(model),
                  "--include", "mlp.nope*", "--out", str(tmp_path / "bad"))
    _assert_clean_error(bad, "'mlp.nope*' matches no layer")
    assert not (tmp_path / "bad").exists()
    out = tmp_path / "sens"
    proc = run_cli("sensitivity", "--task", "ctr", "--dataset", "online-shoppers", "--model", str(model),
                   "--sparsities", "0.5,0.9", "--max-drop", "0.01", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    scan = json.loads((out / "sensitivity.json").read_text())
    assert scan["metric"] == "auc" and scan["layers"] and scan["max_drop"] == 0.01
    for name, curve in scan["layers"].items():
        assert [p["sparsity"] for p in curve] == [0.5, 0.9]
        ok = [p["sparsity"] for p in curve if scan["baseline"] - p["metric"] <= 0.01]
        assert scan["proposal"][name] == max(ok, default=0.0)
    assert (out / "sensitivity.png").stat().st_size > 10_000 and "| proposed |" in (out / "sensitivity.md").read_text()
    rec = resolve(out / "recipe.yaml")
    staged = {n: st.sparsity for st in rec.stages for n in st.include}
    assert staged == {n: s for n, s in scan["proposal"].items() if s > 0}
    assert run_cli("validate", str(out / "recipe.yaml")).returncode == 0
    assert yaml.safe_load((out / "recipe.yaml").read_text())["name"] == "sensitivity-proposal"
