"""Row-pruned tables in the sharded DeepFM: the compact rows are sharded, every rank maps its ids
through the field's replicated id map first; outputs equal the unsharded row-pruned model, and the
checkpoint (compact rows + maps) reloads into another layout."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from slimcart.errors import UsageError
from slimcart.models.compact_embedding import CompactEmbedding, apply_row_pruning, compact_field
from slimcart.models.deepfm import DeepFM
from slimcart.parallel import gather_state, shard_deepfm
from slimcart.parallel.checkpoint import load_sharded, save_sharded
from slimcart.parallel.deepfm import deepfm_tables
from slimcart.parallel.plan import plan_tables
from tests.test_sharding import CFG, launch, make_batch, make_model

KEEP = {0: np.arange(0, 50, 3), 2: np.arange(5, 200, 7)}  # fields 0 and 2 row-pruned, field 1 whole


def pruned_model() -> tuple[DeepFM, dict]:
    model = make_model()
    record = {"fields": [compact_field(model, f, keep) for f, keep in KEEP.items()]}
    return model, record


def plans(model, world):
    tables = deepfm_tables(model)
    return {"table": plan_tables(tables, world, row_wise_threshold_bytes=10**12),
            "row": plan_tables(tables, world, row_wise_threshold_bytes=0)}


def job(rank: int, world: int, out: str) -> dict:
    model, record = pruned_model()
    sparse, dense, _ = make_batch(rank)
    res = {}
    for kind, plan in plans(model, world).items():
        sharded = shard_deepfm(model, plan)
        with torch.no_grad():
            res[f"{kind}/diff"] = (sharded(sparse, dense) - model(sparse, dense)).abs().max().item()
        res[f"{kind}/bytes"] = sharded.tables.local_bytes()
        full = gather_state(sharded)
        if rank == 0:
            rebuilt = apply_row_pruning(DeepFM(CFG), record)
            rebuilt.load_state_dict(full)  # strict: the gathered state is the row-pruned DeepFM's
            with torch.no_grad():
                res[f"{kind}/gathered"] = (rebuilt(sparse, dense) - model(sparse, dense)).abs().max().item()
        folder = f"{out}/{kind}"
        save_sharded(sharded, folder)
        other = plans(model, world)["row" if kind == "table" else "table"]
        again = load_sharded(folder, other)
        with torch.no_grad():
            res[f"{kind}/reloaded"] = (again(sparse, dense) - model(sparse, dense)).abs().max().item()
    return res


def test_row_pruned_shards_serve_the_row_pruned_model(tmp_path):
    results = launch(job, 2, tmp_path, str(tmp_path / "ckpt"))
    model, _ = pruned_model()
    compact_bytes = sum(r * d * 4 for r, d, _ in ((*v[:2], 0) for v in deepfm_tables(model).values()))
    for res in results:
        for kind in ("table", "row"):
            assert res[f"{kind}/diff"] <= 1e-6 and res[f"{kind}/reloaded"] <= 1e-6, res
    assert results[0]["table/gathered"] <= 1e-6 and results[0]["row/gathered"] <= 1e-6
    # row-wise: each rank holds about half of the compact rows (the maps are not table bytes)
    halves = [res["row/bytes"] for res in results]
    assert sum(halves) == compact_bytes and max(halves) <= 0.6 * compact_bytes


def test_half_pruned_field_and_bad_ids_are_named():
    import torch.distributed as dist
    from datetime import timedelta

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1, timeout=timedelta(seconds=30))
    try:
        model, _ = pruned_model()
        broken = copy.deepcopy(model)
        broken.linear_embeddings[0] = torch.nn.Embedding(50, 1)
        with pytest.raises(UsageError, match="Field 0: only one of its two tables"):
            shard_deepfm(broken, plan_tables(deepfm_tables(broken), 1))
        sharded = shard_deepfm(model, plan_tables(deepfm_tables(model), 1))
        assert isinstance(model.embeddings[0], CompactEmbedding)
        sparse, dense, _ = make_batch(0)
        sparse[0, 2] = 200  # one past field 2's 200 original ids
        with pytest.raises(UsageError, match="Ids of field 2 must be in \\[0, 200\\)"):
            sharded(sparse, dense)
    finally:
        dist.destroy_process_group()
