import copy

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import slimcart as sc
from slimcart import UsageError, artifact
from slimcart.accelerate.onnx_export import export_onnx, parity
from slimcart.models import registry as model_registry
from slimcart.models.compact_embedding import CompactEmbedding, apply_row_pruning
from slimcart.prune.embedding_rows import EmbeddingRowPruneConfig, embedding_row_prune
from slimcart.stage import ModelState, StageContext


@pytest.fixture(scope="module")
def syn():
    """Synthetic task and an untrained DeepFM with non-trivial first-order tables."""
    task = sc.load_task("ctr", "synthetic:rows=20000,fields=4,vocab=50000")
    model, spec = task.build_baseline()
    with torch.no_grad():
        for e in model.linear_embeddings:
            e.weight.normal_()
    return task, model.eval(), spec


def _prune(task, model, spec, tmp_path, **cfg):
    state = ModelState.from_module(copy.deepcopy(model), spec)
    report = embedding_row_prune(state, EmbeddingRowPruneConfig(**cfg),
                                 StageContext(task, tmp_path))
    return state, report


def _counts(task, field, num_ids):
    return np.bincount(task.splits["train"].inputs[0][:, field].numpy(), minlength=num_ids)


def test_kept_ids_unchanged_dropped_ids_read_fallback(syn, tmp_path):
    task, model, spec = syn
    state, report = _prune(task, model, spec, tmp_path, min_count=2)
    new = state.torch_model
    for i, old in enumerate(model.embeddings):
        counts = _counts(task, i, old.num_embeddings)
        keep = counts >= 2
        emb, lin = new.embeddings[i], new.linear_embeddings[i]
        assert isinstance(emb, CompactEmbedding) and lin.shared
        assert emb.weight.shape[0] == keep.sum() + 1          # kept rows + the fallback row
        ids = torch.arange(old.num_embeddings)
        with torch.no_grad():
            assert torch.equal(emb(ids[keep]), old.weight[keep])
            assert torch.equal(lin(ids[keep]), model.linear_embeddings[i].weight[keep])
            fallback = emb(ids[~keep])
            assert torch.equal(fallback, emb.weight[0].expand_as(fallback))
            w = torch.as_tensor(counts[~keep], dtype=torch.float64)[:, None]
            mean = (old.weight[~keep].double() * w).sum(0) / w.sum()
            assert torch.allclose(emb.weight[0].double(), mean, atol=1e-6)
    stats = report.stats
    assert stats["rows_after"] < stats["rows_before"]
    assert stats["embedding_bytes_after"] < stats["embedding_bytes_before"]
    assert 0 < stats["train_rows_remapped_share"] < 1
    assert [e["field"] for e in state.spec["row_pruning"]["fields"]] == [0, 1, 2, 3]


def test_keep_ratio_rows_and_norm_criterion(syn, tmp_path):
    task, model, spec = syn
    state, _ = _prune(task, model, spec, tmp_path, keep_ratio=0.1, fields=[1])
    assert state.torch_model.embeddings[1].weight.shape[0] == 5000 + 1
    assert isinstance(state.torch_model.embeddings[0], torch.nn.Embedding)
    top = np.argsort(-_counts(task, 1, 50000), kind="stable")[:5000]
    assert (state.torch_model.embeddings[1].id_map[torch.from_numpy(top)] > 0).all()
    state, _ = _prune(task, model, spec, tmp_path, criterion="norm", keep_ratio=0.2, fields=[2])
    norms = model.embeddings[2].weight.detach().norm(dim=1)
    kept = state.torch_model.embeddings[2].id_map > 0
    assert int(kept.sum()) == 10000 and norms[kept].min() >= norms[~kept].max()


def test_real_data_outputs_unchanged_for_kept_rows(ctr_task, ctr_model, tmp_path):
    spec = ctr_model.slimcart_spec
    state, report = _prune(ctr_task, ctr_model, spec, tmp_path, min_count=5)
    v0 = ctr_task.info["vocab_sizes"][0]
    kept0 = int((_counts(ctr_task, 0, v0) >= 5).sum())
    assert report.changed["embeddings.0 (Clothing ID)"].startswith(f"rows {v0} -> {kept0 + 1} ")
    new = state.torch_model
    x = ctr_task.splits["test"].inputs
    all_kept = torch.ones(len(x[0]), dtype=torch.bool)
    for i, e in enumerate(new.embeddings):
        if isinstance(e, CompactEmbedding):
            all_kept &= e.id_map[x[0][:, i]] > 0
    assert 0 < all_kept.sum() < len(all_kept)
    with torch.no_grad():
        rows = tuple(t[all_kept] for t in x)
        assert torch.equal(ctr_model(*rows), new(*rows))
    # every field is accounted for, changed or skipped with a reason
    assert len(report.changed) + len(report.skipped) == len(ctr_task.info["vocab_sizes"])
    again = embedding_row_prune(state, EmbeddingRowPruneConfig(min_count=5),
                                StageContext(ctr_task, tmp_path))
    assert not again.changed and all(
        r == "already row-pruned" for k, r in again.skipped.items() if k in report.changed)


def test_artifact_round_trip_and_onnx(ctr_task, ctr_model, tmp_path):
    state, _ = _prune(ctr_task, ctr_model, ctr_model.slimcart_spec, tmp_path, keep_ratio=0.3)

    names, x = ctr_task.input_names, ctr_task.example_inputs(256)
    folder = artifact.save(state, tmp_path / "m", task={"name": "ctr"}, examples=x,
                           input_names=names)
    dense = artifact.save(ModelState.from_module(ctr_model, ctr_model.slimcart_spec),
                          tmp_path / "d", task={"name": "ctr"}, examples=x, input_names=names)
    assert artifact.size_bytes(folder) < artifact.size_bytes(dense)
    stored = load_file(str(folder / "model.safetensors"))
    assert stored["embeddings.0.id_map"].dtype == torch.int32
    assert not any(k.startswith("linear_embeddings") and k.endswith("id_map") for k in stored)
    back = artifact.load(folder).torch_model
    with torch.no_grad():
        assert torch.equal(state.torch_model(*x), back(*x))
    path = export_onnx(back, tuple(t[:2] for t in x), tmp_path / "m.onnx",
                       names, ctr_task.dynamic_axes())
    assert parity(back, path, x, names)["max_abs_error"] < 1e-5


@pytest.mark.parametrize("cfg", [{}, {"min_count": 2, "keep_ratio": 0.5}, {"keep_ratio": 0.0},
                                 {"keep_ratio": 1.5}, {"min_count": 0},
                                 {"criterion": "norm", "min_count": 3},
                                 {"criterion": "random", "keep_ratio": 0.5},
                                 {"keep_ratio": 0.5, "fields": []},
                                 {"keep_ratio": 0.5, "fields": [1, 1]},
                                 {"keep_ratio": 0.5, "fields": [-1]},
                                 {"keep_ratio": 0.5, "sparsity": 0.5}])
def test_bad_config_raises(cfg):
    with pytest.raises(ValueError):
        EmbeddingRowPruneConfig(**cfg)


def test_wrong_model_or_field_raises(syn, tmp_path):
    task, model, spec = syn
    with pytest.raises(UsageError, match="nn.Embedding"):
        embedding_row_prune(ModelState.from_module(torch.nn.Linear(3, 1), {}),
                            EmbeddingRowPruneConfig(keep_ratio=0.5), StageContext(task, tmp_path))
    with pytest.raises(UsageError, match="field 9 does not exist"):
        _prune(task, model, spec, tmp_path, keep_ratio=0.5, fields=[9])
