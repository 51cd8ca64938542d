"""Model-parallel DeepFM tables on 1-3 CPU processes with gloo: outputs equal to the unsharded model,
bytes per rank, one data-parallel training step, checkpoints re-split onto another number of
ranks, and the errors a user can trigger. Workers save their results (or their traceback) to
files that the test reads, and every process group has a 30 s timeout, so nothing hangs."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from tests.gloo import free_port, gloo_worker
from slimcart.errors import UsageError
from slimcart.models.deepfm import DeepFM, DeepFMConfig
from slimcart.parallel import (ShardingPlan, deepfm_tables, gather_state, load_sharded, plan_tables,
                               save_sharded, shard_deepfm, sync_grads)

CFG = DeepFMConfig(vocab_sizes=[50, 7, 200], embed_dim=8, num_dense=3, hidden=[16])
BATCH = [5, 9, 4]  # batch size on rank 0, 1, 2: different on purpose
LR, TOL = 0.5, 1e-6
KINDS = ("table", "row", "auto")


def make_model() -> DeepFM:
    torch.manual_seed(0)
    model = DeepFM(CFG)
    with torch.no_grad():  # larger than the defaults (the linear tables start at 0) so every term counts
        for emb in [*model.embeddings, *model.linear_embeddings]:
            emb.weight.normal_(std=0.3)
    return model


def make_batch(rank: int):
    g = torch.Generator().manual_seed(100 + rank)
    n = BATCH[rank]
    sparse = torch.stack([torch.randint(0, v, (n,), generator=g) for v in CFG.vocab_sizes], 1)
    return sparse, torch.randn(n, CFG.num_dense, generator=g), torch.randint(0, 2, (n,), generator=g).float()


def sgd_step(model: torch.nn.Module) -> None:
    """What torch.optim.SGD(lr=LR).step() does, without its first-call start-up cost."""
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p.add_(p.grad, alpha=-LR)


def make_plans(world: int) -> dict[str, ShardingPlan]:
    tables = deepfm_tables(make_model())
    return {"table": plan_tables(tables, world, row_wise_threshold_bytes=10**12),  # whole tables
            "row": plan_tables(tables, world, row_wise_threshold_bytes=0),  # every table split
            "auto": plan_tables(tables, world)}  # the largest table split, the others packed


def launch(job, world: int, out: Path, arg=None) -> list[dict]:
    """Run ``job(rank, world, arg)`` on ``world`` gloo processes and return what each returned."""
    out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    try:
        mp.spawn(gloo_worker, args=(world, port, str(out), job, arg), nprocs=world, join=True)
    except Exception as exc:
        errors = "\n".join(p.read_text() for p in sorted(out.glob("error-*.txt")))
        pytest.fail(f"a worker failed:\n{errors or exc}", pytrace=False)
    return [torch.load(out / f"result-{r}.pt", weights_only=True) for r in range(world)]


def job_two_ranks(rank: int, world: int, ckpt: str) -> dict:
    """Per plan: outputs, bytes held, one SGD step (gathered on rank 0); pooled bags; a checkpoint."""
    model, res = make_model(), {}
    sparse, dense, y = make_batch(rank)
    for kind, plan in make_plans(world).items():
        sharded = shard_deepfm(model, plan)
        with torch.no_grad():
            res[f"{kind}/out"], res[f"{kind}/ref"] = sharded(sparse, dense), model(sparse, dense)
        res[f"{kind}/bytes"], res[f"{kind}/planned"] = sharded.tables.local_bytes(), plan.rank_bytes()[rank]
        F.binary_cross_entropy_with_logits(sharded(sparse, dense), y).backward()
        sync_grads(sharded)
        sgd_step(sharded)
        state = gather_state(sharded)
        if rank == 0:
            res[f"{kind}/state"] = state
        if kind == "row":
            save_sharded(sharded, ckpt)
    # A rank with an empty batch still takes part in both all-to-alls, forward and backward.
    sharded, n = shard_deepfm(model, make_plans(world)["row"]), 0 if rank == 1 else BATCH[rank]
    out = sharded(sparse[:n], dense[:n])
    F.binary_cross_entropy_with_logits(out, y[:n], reduction="sum").backward()
    sync_grads(sharded)
    with torch.no_grad():
        res["empty/out"], res["empty/ref"] = out.detach(), model(sparse[:n], dense[:n])
    tables = sharded.tables
    g = torch.Generator().manual_seed(7 + rank)
    bags = {name: (torch.randint(0, rows, (11 + rank,), generator=g), torch.tensor([0, 3, 3, 7 + rank]))
            for name, rows in (("embeddings.2", 200), ("linear_embeddings.0", 50))}
    for mode in ("sum", "mean"):
        with torch.no_grad():
            got = tables.pooled(bags, mode)
        for name, (ids, offsets) in bags.items():
            want = F.embedding_bag(ids, model.get_submodule(name).weight, offsets, mode=mode)
            res[f"pooled/{mode}/{name}"] = (got[name] - want).abs().max().item()
    return res


def job_load(rank: int, world: int, paths: tuple[str, str, str]) -> dict:
    """Load the 2-rank checkpoint into all 3 ranks, and into a 1-rank group made of rank 2, with
    each plan for that size; load the gathered full state dict too; record the load errors."""
    ckpt, broken, full_state = paths
    alone = dist.new_group([2])  # every rank takes part in creating it
    sparse, dense, _ = make_batch(rank)
    with torch.no_grad():
        res = {"w3/dict/out": load_sharded(torch.load(full_state, weights_only=True),
                                            make_plans(3)["row"])(sparse, dense)}
    for size, group in ((3, None), (1, alone)):
        if size == 1 and rank != 2:
            continue
        for kind, plan in make_plans(size).items():
            model = load_sharded(ckpt, plan, group=group)
            res[f"w{size}/{kind}/bytes"] = model.tables.local_bytes()
            with torch.no_grad():
                res[f"w{size}/{kind}/out"] = model(sparse, dense)
        plan = make_plans(size)["auto"]
        for key, call in (("saved_plan", lambda: load_sharded(ckpt, group=group)),
                          ("two_rank_plan", lambda: load_sharded(ckpt, make_plans(2)["auto"], group=group)),
                          ("missing_file", lambda: load_sharded(broken, plan, group=group))):
            try:
                call()
                res[f"w{size}/{key}"] = "no error"
            except UsageError as exc:
                res[f"w{size}/{key}"] = str(exc)
    return res


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("two-ranks")
    return launch(job_two_ranks, 2, out, str(out / "ckpt")), out / "ckpt"


def total_table_bytes() -> int:
    return sum(rows * bpr for rows, _, bpr in deepfm_tables(make_model()).values())


def test_sharded_outputs_equal_the_unsharded_model(two_ranks):
    results, _ = two_ranks
    for kind in KINDS:
        for rank, res in enumerate(results):
            out, ref = res[f"{kind}/out"], res[f"{kind}/ref"]
            assert out.shape == ref.shape == (BATCH[rank],)
            assert (out - ref).abs().max().item() <= TOL, (kind, rank, out, ref)
    empty, full = results[1]["empty/out"], results[0]["empty/out"]
    assert empty.shape == (0,) and (full - results[0]["empty/ref"]).abs().max().item() <= TOL


def test_each_rank_holds_about_half_the_table_bytes(two_ranks):
    results, total = two_ranks[0], total_table_bytes()
    for kind in KINDS:
        held = [res[f"{kind}/bytes"] for res in results]
        assert held == [res[f"{kind}/planned"] for res in results]
        assert sum(held) == total, (kind, held, total)  # no row is stored twice
    for kind in ("row", "auto"):  # balanced plans: within 5% of half of the 9252 bytes each
        assert all(abs(res[f"{kind}/bytes"] - total / 2) <= 0.05 * total / 2 for res in results), kind


def test_one_sgd_step_equals_the_data_parallel_step(two_ranks):
    """Convention: each rank's loss is the mean over its own batch; the replicated layers' gradients
    are averaged over ranks (all-reduce / world), the tables get the gradients of every rank's ids,
    also divided by the world size. That is one step on the mean of the ranks' losses."""
    results, _ = two_ranks
    model = make_model()
    losses = [F.binary_cross_entropy_with_logits(model(s, d), y) for s, d, y in map(make_batch, range(2))]
    (sum(losses) / 2).backward()
    sgd_step(model)
    want = model.state_dict()
    assert (want["embeddings.2.weight"] - make_model().embeddings[2].weight).abs().max() > 1e-3
    for kind in KINDS:
        got = results[0][f"{kind}/state"]
        assert set(got) == set(want)
        diff = {k: (got[k] - want[k]).abs().max().item() for k in want}
        assert max(diff.values()) <= TOL, (kind, diff)


def test_pooled_bags_equal_embedding_bag(two_ranks):
    for res in two_ranks[0]:
        pooled = {k: v for k, v in res.items() if k.startswith("pooled/")}
        assert len(pooled) == 4 and max(pooled.values()) <= TOL, pooled


def test_checkpoint_from_two_ranks_loads_into_three_ranks_and_one(two_ranks, tmp_path):
    results, ckpt = two_ranks
    broken = tmp_path / "broken"
    shutil.copytree(ckpt, broken)
    (broken / "shard-00001-of-00002.safetensors").unlink()
    torch.save(results[0]["row/state"], tmp_path / "state.pt")  # from gather_state
    loaded = launch(job_load, 3, tmp_path / "run", (str(ckpt), str(broken), str(tmp_path / "state.pt")))
    trained = DeepFM(CFG)
    trained.load_state_dict(results[0]["row/state"])
    for size, ranks in ((3, [0, 1, 2]), (1, [2])):
        for rank in ranks:
            res = loaded[rank]
            sparse, dense, _ = make_batch(rank)
            with torch.no_grad():
                want = trained(sparse, dense)
            for kind in (*KINDS, "dict") if size == 3 else KINDS:
                assert (res[f"w{size}/{kind}/out"] - want).abs().max().item() <= TOL, (size, kind, rank)
            saved, other = res[f"w{size}/saved_plan"], res[f"w{size}/two_rank_plan"]
            assert "saved from 2 ranks" in saved and f"has {size} ranks" in saved, saved
            assert "plan is for 2 ranks" in other and f"has {size} ranks" in other, other
            assert "shard-00001-of-00002.safetensors" in res[f"w{size}/missing_file"]
        assert sum(loaded[r][f"w{size}/auto/bytes"] for r in ranks) == total_table_bytes()


def test_row_wise_table_with_fewer_rows_than_ranks_is_a_usage_error():
    tables = deepfm_tables(make_model())
    with pytest.raises(UsageError, match=r"'embeddings\.1' has 7 rows, fewer than the 8 ranks"):
        plan_tables(tables, 8, row_wise_threshold_bytes=0)
    assert plan_tables(tables, 8).tables["embeddings.1"].kind == "table_wise"  # the default keeps it whole
    with pytest.raises(UsageError, match="at least 1"):
        plan_tables(tables, 0)
    hand_made = make_plans(2)["row"].model_dump()
    hand_made["world_size"] = 8
    with pytest.raises(UsageError, match=r"'embeddings\.1' has 7 rows"):
        ShardingPlan.model_validate(hand_made)
    with pytest.raises(UsageError, match="plan is for 2 ranks but the process group has 3 ranks"):
        make_plans(2)["auto"].check_world_size(3)


def test_plan_describe_json_and_lookup_loads(tmp_path):
    plan = make_plans(2)["auto"]
    text = plan.describe()
    assert "embeddings.2[0:100]" in text and "embeddings.2[100:200]" in text and "rank" in text
    assert ShardingPlan.from_json(plan.to_json(tmp_path / "plan.json")) == plan
    assert ShardingPlan.from_json(tmp_path / "plan.json") == plan
    with pytest.raises(UsageError, match="does not exist"):
        ShardingPlan.from_json(tmp_path / "missing.json")
    tables = {name: (10, 4, 16) for name in "abcd"}
    loads = {"a": [100.0] * 10, "b": [1.0] * 10, "c": [1.0] * 10, "d": [1.0] * 10}
    owner = lambda p: {n: t.ranks[0] for n, t in p.tables.items()}  # noqa: E731
    assert owner(plan_tables(tables, 2)) == {"a": 0, "b": 1, "c": 0, "d": 1}
    assert owner(plan_tables(tables, 2, loads=loads)) == {"a": 0, "b": 1, "c": 1, "d": 1}
    # Row-wise with loads: the hot rows are spread; no rank gets over 2x its fair share (here 1/4)
    # of the rows or of the lookups (give or take one row). Equal rows would give rank 0 92%.
    hot = plan_tables({"t": (100, 4, 16)}, 4, 0, loads={"t": [100.0] * 10 + [1.0] * 90})
    split = hot.tables["t"].offsets
    assert split[1] < 25 and max(hot.rank_loads()) <= 0.5 + 100 / 1090
    assert all(b - a <= 50 + 1 for a, b in zip(split, split[1:])), split
    assert "load" in hot.describe()
