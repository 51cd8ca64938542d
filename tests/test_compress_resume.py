"""Training stages inside a recipe: per-epoch checkpoints that a rerun resumes (Python API and
`slimcart compress --resume`), and data-parallel stages on 2 gloo processes against 1 process."""
from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from slimcart import pipeline
from slimcart.recipe import MeasureConfig, Recipe
from slimcart.stage import ModelState
from slimcart.trainer import Trainer
from slimcart.tasks import load_task
from tests.conftest import run_cli
from tests.gloo import finish, start

DATA = "synthetic:rows=600,fields=3,vocab=40"

RECIPE = Recipe.from_dict({"name": "kd", "version": 1, "stages": [
    {"type": "distill", "student": {"embed_dim": 2, "hidden": [8]}, "epochs": 3, "batch_size": 16, "lr": 0.01,
     "alpha": 0.5}]})
REL = 1e-5


class Killed(Exception):
    pass


def setup():
    task = load_task("ctr", DATA)
    model = task.train_baseline("demo", progress=False)
    return task, ModelState.from_module(model.eval(), model.slimcart_spec)


def run(checkpoints=None):
    import tempfile

    task, state = setup()
    with tempfile.TemporaryDirectory() as tmp:
        out, reports = pipeline.apply_recipe(state, RECIPE, task, Path(tmp), False, checkpoints)
    model = out.torch_model.eval()
    with torch.no_grad():
        test = model(*task.splits["test"].inputs)
    return model.state_dict(), reports[0].stats["train"], test


def max_rel(a: dict, b: dict) -> float:
    return max(((a[k].float() - b[k].float()).abs().max() / b[k].float().abs().max().clamp_min(1e-12)).item()
               for k in b)


def test_an_interrupted_distill_stage_resumes_from_its_last_epoch(tmp_path, monkeypatch):
    straight, rec, _ = run()
    per_epoch = rec["steps"] // 3
    real = Trainer._train_step

    def dies(self, *a, **k):
        if self.step == per_epoch + 2:  # in the second epoch, after the first epoch's checkpoint
            raise Killed
        return real(self, *a, **k)

    monkeypatch.setattr(Trainer, "_train_step", dies)
    with pytest.raises(Killed):
        run(tmp_path / "ck")
    assert (tmp_path / "ck" / "stage0-distill").is_dir()
    monkeypatch.setattr(Trainer, "_train_step", real)
    resumed, rec2, _ = run(tmp_path / "ck")
    assert rec2["resumed_from_step"] == per_epoch and rec2["steps"] == rec["steps"]
    assert max_rel(resumed, straight) < REL
    # a finished stage resumes at its end: the rerun trains nothing and gives the same student
    again, rec3, _ = run(tmp_path / "ck")
    assert rec3["resumed_from_step"] == rec["steps"] and max_rel(again, straight) == 0


def job(rank: int, world: int, folder: str) -> dict:
    """Every rank compresses; the stages' training is data-parallel, rank 0 alone measures."""
    task, state = setup()
    measure = MeasureConfig(batch_sizes=[1], runtimes=["torch"], rounds=30, calls_per_block=1, memory=False,
                            deployed=False, throughput_seconds=0)
    res = pipeline.compress(state.torch_model, task, [RECIPE], spec=state.spec, measure=measure, progress=False,
                            checkpoints=Path(folder) / "ck")
    if res is None:
        return {"none": True}
    try:
        return {"name": res.result.variants[-1].name, "test": torch.from_numpy(res.outputs["kd"])}
    finally:
        res.cleanup()


def test_two_ranks_distill_as_one_and_only_rank_0_measures(tmp_path):
    procs = start(job, 2, tmp_path / "out", str(tmp_path / "two"), timeout_s=60)
    deadline = time.monotonic() + 180
    try:
        _, _, straight = run()
    except BaseException:
        finish(procs, tmp_path / "out", time.monotonic())
        raise
    r0, r1 = finish(procs, tmp_path / "out", deadline)
    assert r1 == {"none": True} and r0["name"] == "kd"
    got = r0["test"].reshape(straight.shape)
    assert ((got - straight).abs().max() / straight.abs().max()).item() < 1e-4
    assert (tmp_path / "two" / "ck" / "kd" / "stage0-distill").is_dir()


def test_cli_resume_errors_name_the_folder(tmp_path):
    base = ["compress", "--task", "ctr", "--dataset", "synthetic:rows=400,fields=2,vocab=20", "--recipe",
            "ctr/int8-dynamic", "--out", "o", "--quiet"]
    got = run_cli(*base, "--resume", cwd=tmp_path)
    assert got.returncode == 2 and "Traceback" not in got.stderr
    assert ".o.checkpoint" in got.stderr and "without --resume" in got.stderr
    (tmp_path / ".o.checkpoint").mkdir()
    got = run_cli(*base, cwd=tmp_path)
    assert got.returncode == 2 and ".o.checkpoint" in got.stderr and "Add --resume" in got.stderr
    assert not (tmp_path / "o").exists()


def test_slimcart_compress_under_torchrun_writes_one_report(tmp_path):
    import os
    import subprocess
    import sys

    from tests.gloo import free_port

    (tmp_path / "kd.yaml").write_text(
        "name: kd\nversion: 1\nstages:\n  - {type: distill, student: {embed_dim: 2}, epochs: 2, alpha: 0.5}\n"
        "measure: {batch_sizes: [1], runtimes: [torch], memory: false, deployed: false, throughput_seconds: 0}\n")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--nproc-per-node", "2", "--rdzv-backend", "c10d",
           "--rdzv-endpoint", f"127.0.0.1:{free_port()}", "-m", "slimcart", "compress", "--task", "ctr",
           "--dataset", DATA, "--recipe", str(tmp_path / "kd.yaml"), "--quiet", "--out", str(tmp_path / "o")]
    got = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**env, "OMP_NUM_THREADS": "1"})
    assert got.returncode == 0, got.stdout + got.stderr
    assert got.stdout.count("report: ") == 1, got.stdout
    assert (tmp_path / "o" / "result.json").is_file() and not (tmp_path / ".o.checkpoint").exists()
