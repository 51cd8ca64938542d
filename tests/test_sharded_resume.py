"""Resuming sharded training: the training state (weights, row-wise Adagrad accumulators split like
the rows, AdamW moments, counters) saved every epoch, continued on the same or another number of
ranks."""
from __future__ import annotations

import shutil
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from slimcart.errors import UsageError
from slimcart.parallel import gather_state
from slimcart.parallel.train import LAST, build_sharded_deepfm, train_sharded
from tests.gloo import finish, start
from tests.test_sharded_training import TRAIN, in_this_process, tiny_data

SETTINGS = {**TRAIN, "patience": 5}


def job(rank: int, world: int, arg: dict) -> dict:
    """Train ``arg["epochs"]`` epochs into ``arg["dir"]`` (``resume``: continue what is there)."""
    splits, cfg, plan = tiny_data(world)
    model = build_sharded_deepfm(cfg, plan, seed=0)
    result = train_sharded(model, splits["train"], splits["val"], **{**SETTINGS, "epochs": arg["epochs"]},
                           checkpoint_dir=arg["dir"], resume=arg.get("resume", False))
    state = gather_state(model)
    return {"state": state, "epochs": result.epochs, "best_epoch": result.best_epoch} if rank == 0 else {}


def _max_diff(a, b):
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_resumed_run_repeats_the_uninterrupted_one_exactly(tmp_path):
    straight = in_this_process(job, {"epochs": 3, "dir": tmp_path / "a"})
    in_this_process(job, {"epochs": 1, "dir": tmp_path / "b"})          # stopped after epoch 1
    assert (tmp_path / "b" / LAST / "trainer.json").is_file()
    resumed = in_this_process(job, {"epochs": 3, "dir": tmp_path / "b", "resume": True})
    assert _max_diff(straight["state"], resumed["state"]) == 0
    assert [e["val_auc"] for e in resumed["epochs"]] == [e["val_auc"] for e in straight["epochs"]]
    assert resumed["best_epoch"] == straight["best_epoch"]
    assert not (tmp_path / "b" / f"{LAST}.next").exists() and not (tmp_path / "b" / f"{LAST}.old").exists()


def test_state_saved_on_two_ranks_resumes_on_one(tmp_path):
    """The accumulators are re-split with the rows: without them the second epoch would take
    Adagrad's first, largest steps again and train differently."""
    straight = in_this_process(job, {"epochs": 2, "dir": tmp_path / "a"})
    procs = start(job, 2, tmp_path / "workers", {"epochs": 1, "dir": tmp_path / "b"})
    finish(procs, tmp_path / "workers", time.monotonic() + 120)
    shutil.copytree(tmp_path / "b", tmp_path / "c")
    for f in (tmp_path / "c" / LAST).glob("optimizer-0*.safetensors"):   # the accumulators, zeroed
        save_file({k: torch.zeros_like(v) for k, v in load_file(str(f)).items()}, str(f))
    resumed = in_this_process(job, {"epochs": 2, "dir": tmp_path / "b", "resume": True})
    zeroed = in_this_process(job, {"epochs": 2, "dir": tmp_path / "c", "resume": True})
    assert _max_diff(straight["state"], resumed["state"]) < 1e-4
    loss = [r["epochs"][1]["train_loss"] for r in (straight, resumed, zeroed)]
    assert loss[1] == pytest.approx(loss[0], rel=1e-5)
    assert abs(loss[2] - loss[0]) > 1e-3 * loss[0], loss


def test_resume_errors_name_what_is_wrong(tmp_path):
    with pytest.raises(UsageError, match="No training state"):
        in_this_process(job, {"epochs": 2, "dir": tmp_path / "none", "resume": True})
    in_this_process(job, {"epochs": 1, "dir": tmp_path / "b"})

    def other_batch(rank, world, arg):
        splits, cfg, plan = tiny_data(world)
        model = build_sharded_deepfm(cfg, plan, seed=0)
        train_sharded(model, splits["train"], splits["val"], **{**SETTINGS, "epochs": 2, "batch_size": 32},
                      checkpoint_dir=arg, resume=True)

    with pytest.raises(UsageError, match="batch_size 64 \\(now 32\\)"):
        in_this_process(other_batch, tmp_path / "b")


def test_cli_resume(tmp_path, capsys, monkeypatch):
    from slimcart.parallel.launch import main as launch_main
    from tests.test_sharded_training import DATASET, MODEL

    monkeypatch.delenv("RANK", raising=False)
    out = tmp_path / "run"
    base = ["--dataset", DATASET, *MODEL, "--batch-size", "256", "--out", str(out), "--quiet"]
    assert launch_main([*base, "--resume"]) == 2
    assert "holds no saved training state" in capsys.readouterr().err
    assert launch_main([*base, "--epochs", "1"]) == 0
    assert launch_main([*base, "--epochs", "2", "--resume", "--overwrite"]) == 2
    assert "contradict" in capsys.readouterr().err
    assert launch_main([*base, "--epochs", "2", "--resume"]) == 0
    import json
    summary = json.loads((out / "summary.json").read_text())
    assert [e["epoch"] for e in summary["epochs"]] == [1, 2]
