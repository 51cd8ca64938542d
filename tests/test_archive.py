""".scz archives: bit-identical round trips, smaller than every other stage, damage found and
named, outputs never half-written or overwritten unasked; and the CLI."""
import json

import pytest
import torch

from slimcart import artifact
from slimcart.errors import ModelError, UsageError
from slimcart.models import build
from slimcart.prune.magnitude import MagnitudePruneConfig, magnitude_prune
from slimcart.quantize.dynamic import Int8DynamicConfig, int8_dynamic
from slimcart.quantize.kmeans import WeightSharingConfig, weight_sharing
from slimcart.stage import ModelState, StageContext
from slimcart.storage.archive import read_archive, write_archive
from tests.conftest import run_cli
from tests.tiny import tiny_inputs

CNN = {"arch": "resnet_small", "config": {"widths": [8, 16, 32], "blocks": [1, 1, 1], "num_classes": 5}}
MLP = {"arch": "mlp", "config": {"in_shape": [1, 16, 16], "hidden": [64, 32], "num_classes": 5}}
INTS = {torch.float32: torch.int32, torch.int64: torch.int64, torch.float16: torch.int16}


def _bits(t):
    return t.view(INTS[t.dtype]) if t.dtype in INTS else t


def _compressed(spec, tmp_path, sparsity=0.9, bits=4, name="m"):
    torch.manual_seed(0)
    model = build(spec).eval()
    state = ModelState.from_module(model, spec)
    ctx = StageContext(task=None, workdir=tmp_path, progress=False)
    magnitude_prune(state, MagnitudePruneConfig(sparsity=sparsity), ctx)
    weight_sharing(state, WeightSharingConfig(bits=bits), ctx)
    folder = artifact.save(state, tmp_path / name, task={"name": "t"}, examples=tiny_inputs("cnn", 4),
                           input_names=("pixels",))
    (folder / "train.json").write_text(json.dumps({"epochs": 1}))
    return model, folder


def _same_tensors(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(_bits(sa[k]), _bits(sb[k])), k


@pytest.mark.parametrize("spec", [CNN, MLP], ids=["cnn", "mlp"])
def test_round_trip_is_bit_identical(spec, tmp_path):
    model, folder = _compressed(spec, tmp_path)
    info = write_archive(folder, tmp_path / "m.scz")
    assert info["bytes"] == (tmp_path / "m.scz").stat().st_size
    out = read_archive(tmp_path / "m.scz", tmp_path / "back")
    back = artifact.load(out).torch_model
    _same_tensors(model, back)
    x = tiny_inputs("cnn", 6)
    with torch.inference_mode():
        assert torch.equal(back(*x), model(*x))
    meta, meta2 = artifact.read_meta(folder), artifact.read_meta(out)
    assert {k: v for k, v in meta.items() if k != "encoding"} == {k: v for k, v in meta2.items() if k != "encoding"}
    assert (out / "train.json").read_text() == (folder / "train.json").read_text()
    ex, ex2 = artifact.load_examples(folder)[0], artifact.load_examples(out)[0]
    assert ex2.shape[0] == 1 and torch.equal(ex2, ex[:1])
    # the rebuilt folder stores the shared weights as codebook + indices, as it was saved
    assert artifact.size_bytes(out) <= artifact.size_bytes(folder) + 64
    write_archive(folder, tmp_path / "all.scz", all_examples=True)
    read_archive(tmp_path / "all.scz", tmp_path / "all")
    assert torch.equal(artifact.load_examples(tmp_path / "all")[0], ex)


def test_every_stage_is_smaller(tmp_path):
    _, folder = _compressed(CNN, tmp_path)
    info = write_archive(folder, tmp_path / "m.scz")
    sizes = [r["bytes"] for r in info["stages"]]
    dense, pruned, shared, huff, whole = sizes
    assert dense > 2 * pruned > 0 and pruned > shared > huff and whole == info["bytes"]
    assert whole < dense / 8
    assert shared == (folder / "model.safetensors").stat().st_size  # what the folder holds
    kinds = info["kinds"]
    assert kinds["layers.2.conv2.weight"] == "shared_sparse" and kinds["stem.1.running_var"] in ("raw", "shared")
    stored = json.loads((folder / "slimcart.json").read_text())["encoding"]
    assert stored["scheme"] == "codebook"
    assert stored["tensors"]["layers.2.conv2.weight"]["encoding"] == "codebook_sparse"


def test_int8_model_round_trip(tmp_path):
    torch.manual_seed(0)
    model = build(MLP).eval()
    state = ModelState.from_module(model, MLP)
    int8_dynamic(state, Int8DynamicConfig(), StageContext(task=None, workdir=tmp_path, progress=False))
    folder = artifact.save(state, tmp_path / "q", task={"name": "t"}, examples=tiny_inputs("cnn", 2),
                           input_names=("pixels",))
    write_archive(folder, tmp_path / "q.scz")
    back = artifact.load(read_archive(tmp_path / "q.scz", tmp_path / "qb"))
    x = tiny_inputs("cnn", 5)
    with torch.inference_mode():
        assert torch.equal(back.torch_model(*x), state.torch_model(*x))


def _damage(path, offset, value=None):
    data = bytearray(path.read_bytes())
    data[offset] = value if value is not None else data[offset] ^ 0x5A
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("how, match", [
    ("last byte", "section .* is damaged: its checksum"), ("header byte", "header"),
    ("magic", "wrong magic"), ("truncated", "truncated"), ("trailing", "trailing bytes"),
    ("version", "archive version")])
def test_damage_is_a_model_error_naming_the_file(how, match, tmp_path):
    _, folder = _compressed(MLP, tmp_path)
    path = tmp_path / "m.scz"
    write_archive(folder, path)
    if how == "last byte":
        _damage(path, path.stat().st_size - 1)
    elif how == "header byte":
        _damage(path, 30)
    elif how == "magic":
        _damage(path, 1)
    elif how == "truncated":
        path.write_bytes(path.read_bytes()[:-100])
    elif how == "trailing":
        path.write_bytes(path.read_bytes() + b"\0")
    elif how == "version":
        _damage(path, 8, 7)
    with pytest.raises(ModelError, match=match) as err:
        read_archive(path, tmp_path / "out")
    assert str(path) in err.value.message
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_damaged_section_names_the_tensor(tmp_path):
    _, folder = _compressed(MLP, tmp_path)
    path = tmp_path / "m.scz"
    write_archive(folder, path)
    size = path.stat().st_size
    _damage(path, size - 400)  # inside the weight sections (the examples and files come last)
    with pytest.raises(ModelError, match=r"(weights|examples) tensor .* part|file"):
        read_archive(path, tmp_path / "out")


def test_outputs_are_not_overwritten_unasked(tmp_path):
    _, folder = _compressed(MLP, tmp_path)
    path = tmp_path / "m.scz"
    write_archive(folder, path)
    first = path.read_bytes()
    with pytest.raises(UsageError, match="already exists"):
        write_archive(folder, path)
    write_archive(folder, path, overwrite=True)
    assert path.read_bytes() == first  # deterministic
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("keep")
    with pytest.raises(UsageError, match="already exists"):
        read_archive(path, tmp_path / "out")
    assert (tmp_path / "out" / "mine.txt").read_text() == "keep"
    read_archive(path, tmp_path / "out", overwrite=True)
    assert not (tmp_path / "out" / "mine.txt").exists() and (tmp_path / "out" / "slimcart.json").is_file()
    with pytest.raises(UsageError, match="is a folder"):
        write_archive(folder, tmp_path / "out", overwrite=True)
    with pytest.raises(ModelError, match="not a slimcart model folder"):
        write_archive(tmp_path, tmp_path / "x.scz")
    assert not (tmp_path / "x.scz").exists() and not list(tmp_path.glob(".x.scz*"))


def test_cli_round_trip(tmp_path):
    model, folder = _compressed(CNN, tmp_path)
    res = run_cli("archive", str(folder), str(tmp_path / "m.scz"))
    assert res.returncode == 0, res.stderr
    assert "+ Huffman" in res.stdout and "storage and transfer" in res.stdout
    res = run_cli("unarchive", str(tmp_path / "m.scz"), str(tmp_path / "back"))
    assert res.returncode == 0, res.stderr
    assert "rebuilt" in res.stdout
    _same_tensors(model, artifact.load(tmp_path / "back").torch_model)


def _main(monkeypatch, capsys, *args):
    from slimcart import cli

    monkeypatch.setattr("sys.argv", ["slimcart", *args])
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    return exit_.value.code, capsys.readouterr()


def test_cli_errors_are_clean(tmp_path, monkeypatch, capsys):
    _, folder = _compressed(MLP, tmp_path)
    write_archive(folder, tmp_path / "m.scz")
    code, res = _main(monkeypatch, capsys, "archive", str(folder), str(tmp_path / "m.scz"))
    assert code == 2 and "already exists" in res.err and "--overwrite" in res.err
    _damage(tmp_path / "m.scz", 2)
    code, res = _main(monkeypatch, capsys, "unarchive", str(tmp_path / "m.scz"), str(tmp_path / "other"))
    assert code == 2 and "wrong magic" in res.err and str(tmp_path / "m.scz") in res.err
    assert "Traceback" not in res.err and not (tmp_path / "other").exists()


def test_serving_files_travel_with_the_model(tmp_path):
    _, folder = _compressed(MLP, tmp_path)
    meta = json.loads((folder / "slimcart.json").read_text())
    (folder / "preprocess.json").write_text(json.dumps({"kind": "image", "mean": 0.28}))
    (folder / "tokenizer").mkdir()
    (folder / "tokenizer" / "vocab.txt").write_text("a\nb\n" * 100)
    meta["serving_files"] = ["preprocess.json", "tokenizer/vocab.txt"]
    (folder / "slimcart.json").write_text(json.dumps(meta))
    info = write_archive(folder, tmp_path / "m.scz")
    assert 0 < info["files_bytes"] < 200  # zlib-compressed
    out = read_archive(tmp_path / "m.scz", tmp_path / "back")
    for name in meta["serving_files"] + ["train.json"]:
        assert (out / name).read_bytes() == (folder / name).read_bytes()
    (folder / "tokenizer" / "vocab.txt").unlink()
    with pytest.raises(ModelError, match="tokenizer/vocab.txt"):
        write_archive(folder, tmp_path / "n.scz")
    assert not (tmp_path / "n.scz").exists()


def test_version_1_archives_are_still_read(tmp_path, monkeypatch):
    from slimcart.storage import archive, archive_codec

    model, folder = _compressed(MLP, tmp_path)
    with monkeypatch.context() as m:   # how version 1 wrote: gaps bounded at 255, float32 parts
        m.setattr(archive, "VERSION", 1)
        m.setattr(archive_codec, "ESCAPES", (255,))
        m.setattr(archive_codec, "_halve", lambda u: None)
        write_archive(folder, tmp_path / "v1.scz")
    write_archive(folder, tmp_path / "v2.scz")
    assert (tmp_path / "v1.scz").read_bytes()[8] == 1 and (tmp_path / "v2.scz").read_bytes()[8] == 2
    assert (tmp_path / "v2.scz").stat().st_size < (tmp_path / "v1.scz").stat().st_size
    for name in ("v1", "v2"):
        _same_tensors(model, artifact.load(read_archive(tmp_path / f"{name}.scz", tmp_path / name)).torch_model)
