"""Quantized table shards for sharded serving: each rank holds its rows as row-wise int4/int8 codes
and dequantizes the rows it is asked for; outputs equal the unsharded model with the same tables
quantized, and each rank holds a share of the quantized bytes."""
from __future__ import annotations

import copy

import pytest
import torch

from slimcart.errors import UsageError
from slimcart.models.quant_embedding import QuantEmbedding, replace_table
from slimcart.parallel import gather_state, shard_deepfm
from tests.test_sharding import CFG, launch, make_batch, make_model, make_plans

TABLES = [f"embeddings.{i}" for i in range(len(CFG.vocab_sizes))]   # the 8-wide tables


def job(rank: int, world: int, bits: int) -> dict:
    model = make_model()
    ref = copy.deepcopy(model)
    for name in TABLES:
        replace_table(ref, name, QuantEmbedding.from_float(ref.get_submodule(name).weight, bits, "float16"))
    sparse, dense, _ = make_batch(rank)
    res = {}
    for kind, plan in make_plans(world).items():
        sharded = shard_deepfm(model, plan)
        before = sharded.tables.local_bytes()
        done = sharded.tables.quantize_(bits, "float16", tables=TABLES)
        with torch.no_grad():
            res[f"{kind}/diff"] = (sharded(sparse, dense) - ref(sparse, dense)).abs().max().item()
            res[f"{kind}/float_diff"] = (sharded(sparse, dense) - model(sparse, dense)).abs().max().item()
        res[f"{kind}/bytes"] = (before, sharded.tables.local_bytes(), sum(a - b for a, b in done.values()))
        try:
            gather_state(sharded)
            res[f"{kind}/gather"] = "no error"
        except UsageError as exc:
            res[f"{kind}/gather"] = str(exc)
    return res


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_shards_serve_the_quantized_model(bits, tmp_path):
    results = launch(job, 2, tmp_path, bits)
    for rank, res in enumerate(results):
        for kind in ("table", "row", "auto"):
            assert res[f"{kind}/diff"] <= 1e-5, (kind, rank, res[f"{kind}/diff"])
            assert res[f"{kind}/float_diff"] > 0     # it did quantize
            before, after, saved = res[f"{kind}/bytes"]
            assert before - after == saved and (saved > 0 or before == 0)
            assert "quantized" in res[f"{kind}/gather"]
    # row-wise: both ranks hold rows of every table, and each holds less than its float share
    limit = 0.6 if bits == 4 else 0.9    # the 1-wide tables stay float
    for before, after, _ in (res["row/bytes"] for res in results):
        assert 0 < after < limit * before, (before, after)


def test_unknown_table_is_named():
    import torch.distributed as dist
    from datetime import timedelta
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1, timeout=timedelta(seconds=30))
    try:
        sharded = shard_deepfm(make_model(), make_plans(1)["auto"])
        with pytest.raises(UsageError, match="not in this collection"):
            sharded.tables.quantize_(4, tables=["embeddings.9"])
        with pytest.raises(UsageError, match="bits"):
            sharded.tables.quantize_(3)
    finally:
        dist.destroy_process_group()
