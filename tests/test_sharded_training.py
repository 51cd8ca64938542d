"""Sharded DeepFM training (slimcart.parallel.train) and its torchrun launcher
(slimcart.parallel.launch) on a tiny synthetic click log, with 1 and 2 gloo processes.

Workers are plain spawned processes that save their result (or their traceback) to a file; every
wait has a deadline and leftover processes are killed, so a failing test cannot hang."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from tests.gloo import finish, free_port, start
from slimcart.models.deepfm import DeepFMConfig
from slimcart.parallel import gather_state, plan_tables
from slimcart.parallel.launch import main as launch_main
from slimcart.parallel.train import (EMBED_INIT_STD, RowWiseAdagrad, build_sharded_deepfm, config_tables,
                                     init_rows, roc_auc, train_sharded)

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
DATASET = "synthetic:rows=4000,fields=3,vocab=500"
MODEL = ["--embed-dim", "4", "--hidden", "8"]
TRAIN = dict(epochs=1, batch_size=64, lr=0.01, table_lr=0.05, seed=0, log=None)
AUC_TOL = 0.02  # asked for; the runs below agree to ~1e-6 (only float summation order differs)
FEW_ROWS = 128  # rows of the short run that checks untouched table rows
CFG = DeepFMConfig(vocab_sizes=[500] * 3, num_dense=2, embed_dim=4, hidden=[8])  # fits DATASET


def tiny_data(world: int):
    """The tiny click log split 80/10/10 (straight from the generator: the workers need not import
    the ctr task and its sklearn), its DeepFM config and a plan for ``world`` ranks."""
    from slimcart.data import synthetic

    log = synthetic.generate(synthetic.parse_spec(DATASET))
    order = torch.randperm(len(log.labels), generator=torch.Generator().manual_seed(0))
    n = len(order)
    inputs, labels = (torch.as_tensor(log.sparse), torch.as_tensor(log.dense)), torch.as_tensor(log.labels)
    splits = {k: (tuple(t[idx] for t in inputs), labels[idx])
              for k, idx in zip(("train", "val", "test"), order.split([n * 8 // 10, n // 10, n - n * 9 // 10]))}
    return splits, CFG, plan_tables(config_tables(CFG), world)


def job_train(rank: int, world: int, _) -> dict:
    """One epoch on the tiny data; then a run on FEW_ROWS train rows only, from another seed."""
    splits, cfg, plan = tiny_data(world)
    model = build_sharded_deepfm(cfg, plan, seed=0)
    result = train_sharded(model, splits["train"], splits["val"], **TRAIN)
    epoch = result.epochs[0]
    out = {"val_auc": epoch["val_auc"], "train_loss": epoch["train_loss"], "seconds": epoch["seconds"],
           "samples_per_s": epoch["samples_per_s"], "table_bytes": torch.tensor(epoch["table_bytes"]),
           "held": model.tables.local_bytes()}
    state = gather_state(model)
    (x, y) = splits["train"]
    few = (tuple(t[:FEW_ROWS] for t in x), y[:FEW_ROWS])
    sparse_model = build_sharded_deepfm(cfg, plan, seed=1)
    train_sharded(sparse_model, few, splits["val"], **TRAIN)
    sparse_state = gather_state(sparse_model)
    if rank == 0:
        out.update(state=state, sparse_state=sparse_state, looked_up=few[0][0])
    return out


def in_this_process(job, arg=None):
    """``job(0, 1, arg)`` in this process, in a gloo group of one that is gone afterwards."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1,
                            timeout=timedelta(seconds=30))
    try:
        return job(0, 1, arg)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The same job on 2 spawned processes and, meanwhile, on this process alone."""
    out = tmp_path_factory.mktemp("train")
    procs = start(job_train, 2, out)
    deadline = time.monotonic() + 120
    try:
        one = in_this_process(job_train)
    except BaseException:
        finish(procs, out, time.monotonic())  # kills the workers
        raise
    return {1: [one], 2: finish(procs, out, deadline)}


def test_two_processes_reach_the_auc_of_one(trained):
    one, two = trained[1][0], trained[2]
    assert two[0]["val_auc"] == pytest.approx(two[1]["val_auc"], abs=0)  # broadcast: every rank agrees
    assert one["val_auc"] > 0.6, one["val_auc"]  # it learned something in one epoch
    assert abs(one["val_auc"] - two[0]["val_auc"]) <= AUC_TOL, (one["val_auc"], two[0]["val_auc"])
    assert one["train_loss"] == pytest.approx(two[0]["train_loss"], rel=1e-4)
    # Same start, same global batches: the weights agree up to float summation order.
    diff = max((one["state"][k] - two[0]["state"][k]).abs().max().item() for k in one["state"])
    assert diff < 1e-3, diff
    # Each rank holds only its share of the tables; the two shares add up to the whole.
    total = sum(rows * bpr for rows, _, bpr in config_tables(CFG).values())
    assert [r["held"] for r in two] == two[0]["table_bytes"].tolist()
    assert sum(r["held"] for r in two) == one["held"] == total
    assert max(r["held"] for r in two) < 0.6 * total


def test_rows_never_looked_up_stay_exactly_unchanged(trained):
    cfg = CFG
    for world in (1, 2):
        res = trained[world][0]
        state, ids = res["sparse_state"], res["looked_up"]
        for name, (rows, dim, _) in config_tables(cfg).items():
            std = EMBED_INIT_STD if name.startswith("embeddings.") else 0.0
            start, got = init_rows(name, 0, rows, dim, seed=1, std=std), state[f"{name}.weight"]
            used = torch.zeros(rows, dtype=torch.bool)
            used[ids[:, int(name.split(".")[1])]] = True
            assert used.sum() < rows  # some rows were never looked up ...
            assert torch.equal(got[~used], start[~used]), (world, name)  # ... and are bit-for-bit the same
            changed = (got != start).any(1)
            assert changed[used].float().mean() > 0.95, (world, name)  # the looked-up rows moved


def test_row_wise_adagrad_touches_only_rows_with_a_gradient():
    w = torch.nn.Parameter(torch.randn(10, 4))
    before = w.detach().clone()
    opt = RowWiseAdagrad([w], lr=0.1)
    w.grad = torch.zeros(10, 4)
    w.grad[[2, 5]] = torch.tensor([[1.0, -2.0, 0.5, 0.0], [0.0, 0.0, 0.0, 3.0]])
    opt.step()
    acc = opt.state[w]["sum"]
    assert opt.rows_updated == 2 and opt.state_bytes() == 10 * 4
    assert torch.equal(w.detach()[[0, 1, 3, 4, 6, 7, 8, 9]], before[[0, 1, 3, 4, 6, 7, 8, 9]])
    assert acc[2].item() == pytest.approx((1 + 4 + 0.25) / 4) and acc[5].item() == pytest.approx(9 / 4)
    want = before[2] - 0.1 * w.grad[2] / (acc[2].sqrt() + 1e-8)
    assert torch.allclose(w.detach()[2], want) and acc[[0, 1, 3]].eq(0).all()


def test_numpy_auc_equals_sklearn():
    from sklearn.metrics import roc_auc_score

    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 2, (500,), generator=g).numpy()
    s = (torch.randn(500, generator=g) + torch.as_tensor(y) * 0.7).round(decimals=1).numpy()  # with ties
    assert abs(roc_auc(y, s) - roc_auc_score(y, s)) < 1e-12
    assert roc_auc(y * 0, s) != roc_auc(y * 0, s)  # one class: NaN


def run_cmd(cmd: list[str], timeout: float, env: dict | None = None) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=timeout,
                          env={**full, "OMP_NUM_THREADS": "1", **(env or {})})


def test_torchrun_two_ranks_then_evaluate_the_checkpoint_in_one_process(tmp_path, capsys, monkeypatch):
    out = tmp_path / "sharded"
    cmd = [str(BIN / "torchrun"), "--nproc-per-node", "2", "--rdzv-backend", "c10d",
           "--rdzv-endpoint", f"127.0.0.1:{free_port()}", "-m", "slimcart.parallel.launch",
           "--dataset", DATASET, *MODEL, "--epochs", "1", "--batch-size", "64", "--lr", "0.01",
           "--threads", "1", "--timeout-s", "30", "--out", str(out)]
    run = run_cmd(cmd, timeout=90)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "Sharding plan: 6 tables over 2 rank(s)" in run.stdout and "epoch 1: train loss" in run.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["plan"]["world_size"] == 2 and len(summary["epochs"]) == 1
    epoch = summary["epochs"][0]
    for key in ("train_loss", "val_auc", "seconds", "samples_per_s"):
        assert epoch[key] > 0, key
    assert len(epoch["peak_rss_bytes"]) == 2 and min(epoch["peak_rss_bytes"]) > 10 * 2**20
    assert [r["table_bytes"] for r in summary["ranks"]] == summary["plan_rank_bytes"]
    assert sorted(p.name for p in (out / "checkpoint").iterdir()) == [
        "config.json", "dense.safetensors", "last", "plan.json",
        "shard-00000-of-00002.safetensors", "shard-00001-of-00002.safetensors"]
    assert sorted(p.name for p in (out / "checkpoint" / "last").iterdir()) == [   # the training state
        "config.json", "dense.safetensors", "optimizer-00000-of-00002.safetensors",
        "optimizer-00001-of-00002.safetensors", "optimizer-dense.safetensors", "plan.json",
        "shard-00000-of-00002.safetensors", "shard-00001-of-00002.safetensors", "trainer.json"]
    # The 2-rank checkpoint, loaded and scored by one process (this one: no RANK in its environment).
    monkeypatch.delenv("RANK", raising=False)
    capsys.readouterr()
    code = launch_main(["--dataset", DATASET, "--evaluate-from", str(out / "checkpoint"),
                        "--out", str(tmp_path / "eval")])
    ev = capsys.readouterr()
    assert code == 0 and not dist.is_initialized(), ev.out + ev.err
    evaluation = json.loads((tmp_path / "eval" / "evaluation.json").read_text())
    assert evaluation["world_size"] == 1 and evaluation["saved_world_size"] == 2
    assert abs(evaluation["test"]["auc"] - summary["test"]["auc"]) <= 1e-6, (evaluation["test"], summary["test"])
    assert f"test AUC {summary['test']['auc']:.6f}" in ev.out


@pytest.mark.parametrize("how", ["exits", "hangs"])
def test_a_lost_rank_ends_rank_0_with_an_error_not_a_hang(tmp_path, how):
    """Rank 0 is the real launcher; rank 1 joins the group, then exits (or stops answering)."""
    port, timeout_s = free_port(), 5
    env = {"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "LOCAL_RANK": "0"}
    peer = ("import os, sys, time, datetime, torch.distributed as d; "
            "d.init_process_group('gloo', timeout=datetime.timedelta(seconds=60)); "
            + ("os._exit(1)" if how == "exits" else "time.sleep(60)"))
    full = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    other = subprocess.Popen([sys.executable, "-c", peer], env={**full, **env, "RANK": "1", "LOCAL_RANK": "1"},
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        t0 = time.monotonic()
        run = run_cmd([sys.executable, "-m", "slimcart.parallel.launch", "--dataset", DATASET, *MODEL,
                       "--epochs", "1", "--threads", "1", "--timeout-s", str(timeout_s),
                       "--out", str(tmp_path / "out")], timeout=60, env={**env, "RANK": "0"})
        elapsed = time.monotonic() - t0
    finally:
        other.kill()
        other.wait(10)
    assert run.returncode == 1, run.stdout + run.stderr
    assert "[rank 0] error: rank 0: a collective operation failed" in run.stderr, run.stderr
    assert "Traceback" not in run.stderr and "--timeout-s" in run.stderr
    assert elapsed < 30, elapsed  # start-up + load + at most the 5 s timeout, not a hang


def test_bad_input_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    cases = [
        (["--dataset", DATASET, "--out", str(tmp_path / "a"), "--epochs", "0"], "--epochs must be at least 1"),
        (["--dataset", DATASET], "Training needs --out"),
        (["--dataset", DATASET, "--out", str(tmp_path / "full")], "already holds files"),
        (["--dataset", "synthetic:rows=10", "--out", str(tmp_path / "b")], "rows=10 is out of range"),
        (["--dataset", DATASET, "--evaluate-from", str(tmp_path)], "not a sharded checkpoint"),
        (["--dataset", DATASET, "--out", str(tmp_path / "c"), "--hidden", "8,x"], "--hidden takes"),
    ]
    for argv, message in cases:
        assert launch_main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and "Traceback" not in err, (argv, err)
