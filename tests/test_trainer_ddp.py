"""Data-parallel training in slimcart.trainer.Trainer: 2 gloo processes against 1 process on a tiny
DeepFM, uninterrupted and resumed from checkpoints written by either world size, and
`slimcart train` under torchrun."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from slimcart.models import build
from slimcart.parallel.data_parallel import broadcast_float_buffers
from slimcart.tasks.base import TrainConfig
from slimcart.tasks.ctr import CTRTask
from slimcart.trainer import Callback, LossTerm, TaskLoss, Trainer
from tests.gloo import finish, free_port, start
from tests.tiny import TINY, tiny_ctr_task

# 120 train rows in batches of 17: slices of 8 and 9 rows, and a last batch of 1 row (rank 0 gets none)
CFG = TrainConfig(epochs=2.5, batch_size=17, lr=3e-3, weight_decay=1e-4, warmup_ratio=0.2, seed=3)
REL = 1e-5
ROOT = Path(__file__).resolve().parent.parent


def make_task() -> CTRTask:
    return tiny_ctr_task()


def make_model(seed: int = 0):
    torch.manual_seed(seed)
    return build(TINY["deepfm"])


class HiddenMSE(LossTerm):  # reads the captured hidden output
    name, weight = "hidden", 0.5

    def __call__(self, batch, model):
        return batch.hidden["mlp.0"].pow(2).mean()


class RowTarget(LossTerm):  # reads batch.index: a fixed target per train row
    name, weight = "row", 0.1
    targets = torch.linspace(-1, 1, 120)

    def __call__(self, batch, model):
        return (batch.outputs - self.targets[batch.index]).pow(2).mean()


class Stop(Exception):
    pass


class StopAt(Callback):
    def on_batch_start(self, trainer, batch_inputs):
        if trainer.step == 11:
            raise Stop


def fit(model_seed: int = 0, ckpt=None, stop: bool = False) -> dict:
    """Train (every rank of the group, or alone); the final state, losses and validation scores."""
    task, model = make_task(), make_model(model_seed)
    trainer = Trainer(task, model, CFG, terms=[TaskLoss(task), HiddenMSE(), RowTarget()],
                      capture=["mlp.0"], checkpoint_dir=ckpt, checkpoint_every=5 if ckpt else 0,
                      callbacks=[StopAt()] if stop else [], progress=False)
    try:
        rec = trainer.fit()
    except Stop:
        return {}
    return {"state": model.state_dict(), "losses": torch.tensor(trainer.losses), "val": rec["val"],
            "terms": {k: torch.tensor(v) for k, v in trainer.term_values.items()},
            "resumed": rec["resumed_from_step"] or 0, "steps": rec["steps"]}


def job(rank: int, world: int, folder: str) -> dict:
    """On 2 ranks: a full run; an interrupted run (checkpoints at steps 5 and 10, stopped in step 11),
    a copy of its checkpoint, then the resumed run; a run resumed from a 1-process checkpoint."""
    folder = Path(folder)
    out = {"full": fit()}
    fit(ckpt=folder / "two", stop=True)
    if rank == 0:
        shutil.copytree(folder / "two", folder / "two-at-10")
    torch.distributed.barrier()
    out["resumed"] = fit(model_seed=7, ckpt=folder / "two")
    out["from_one"] = fit(model_seed=7, ckpt=folder / "one-copy")
    bn = torch.nn.BatchNorm1d(3)
    bn.running_mean.fill_(rank + 1.0)
    broadcast_float_buffers(bn)  # what the trainer does after every step
    out["bn"] = bn.running_mean
    return out


def max_rel(a: dict, b: dict) -> float:
    return max(((a[k] - b[k]).abs().max() / b[k].abs().max().clamp_min(1e-12)).item() for k in b)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ddp")
    fit(ckpt=folder / "one", stop=True)
    shutil.copytree(folder / "one", folder / "one-copy")
    procs = start(job, 2, folder / "out", str(folder))
    deadline = time.monotonic() + 120
    try:
        one = fit()
        one_resumed = fit(model_seed=7, ckpt=folder / "one")
    except BaseException:
        finish(procs, folder / "out", time.monotonic())
        raise
    two = finish(procs, folder / "out", deadline)
    return {"one": one, "one_resumed": one_resumed, "two": two,
            "one_from_two": fit(model_seed=7, ckpt=folder / "two-at-10")}


def test_two_processes_take_the_steps_of_one(runs):
    one, (r0, r1) = runs["one"], runs["two"]
    for key in ("full", "resumed", "from_one"):  # the replicas stay bit-for-bit the same
        assert all(torch.equal(r0[key]["state"][k], r1[key]["state"][k]) for k in r0[key]["state"])
        assert torch.equal(r0[key]["losses"], r1[key]["losses"])
    assert torch.equal(r1["bn"], torch.ones(3))
    two = r0["full"]
    assert two["steps"] == one["steps"] == 20
    rel = max_rel(two["state"], one["state"])
    assert rel < REL, rel
    assert torch.allclose(two["losses"], one["losses"], rtol=REL, atol=0)
    for k in ("task", "hidden", "row"):
        assert torch.allclose(two["terms"][k], one["terms"][k], rtol=REL, atol=1e-8), k
    assert two["val"] == pytest.approx(one["val"], rel=REL)
    print(f"2 vs 1 process: max relative parameter difference {rel:.2e}, max relative loss difference "
          f"{((two['losses'] - one['losses']).abs() / one['losses'].abs()).max().item():.2e}")


def test_resumed_two_process_run_matches_the_uninterrupted_one(runs):
    full, resumed = runs["two"][0]["full"], runs["two"][0]["resumed"]
    assert resumed["resumed"] == 10 and resumed["steps"] == 20
    assert max_rel(resumed["state"], full["state"]) < REL
    assert torch.allclose(resumed["losses"][-10:], full["losses"][-10:], rtol=REL, atol=0)


def test_checkpoints_move_between_one_and_two_processes(runs):
    one = runs["one"]
    for got in (runs["one_from_two"], runs["two"][0]["from_one"], runs["one_resumed"]):
        assert got["resumed"] == 10 and got["steps"] == 20
        rel = max_rel(got["state"], one["state"])
        assert rel < REL, rel
        assert torch.allclose(got["losses"][-10:], one["losses"][-10:], rtol=REL, atol=0)


def test_slimcart_train_under_torchrun_saves_the_one_process_model(tmp_path):
    dataset = "synthetic:rows=2000,fields=3,vocab=100"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--nproc-per-node", "2", "--rdzv-backend", "c10d",
           "--rdzv-endpoint", f"127.0.0.1:{free_port()}", "-m", "slimcart", "train", "--task", "ctr",
           "--dataset", dataset, "--budget", "demo", "--quiet", "--out", str(tmp_path / "m")]
    run = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120,
                         env={**env, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.count("saved ") == 1, run.stdout
    assert not (tmp_path / ".m.checkpoint").exists()
    from slimcart.tasks import load_task

    want = load_task("ctr", dataset, seed=0).train_baseline("demo", seed=0, progress=False).state_dict()
    got = load_file(str(tmp_path / "m" / "model.safetensors"))
    assert set(got) == set(want)
    assert max_rel(got, want) < REL
