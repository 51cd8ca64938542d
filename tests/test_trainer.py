import math

import numpy as np
import pytest
import torch

from slimcart.errors import UsageError
from slimcart.models import build
from slimcart.tasks.base import TrainConfig
from slimcart.tasks.ctr import CTRTask
from slimcart.trainer import Callback, LossTerm, Trainer
from tests.tiny import TINY, tiny_ctr_task

CFG = TrainConfig(epochs=2.5, batch_size=16, lr=3e-3, weight_decay=1e-4, warmup_ratio=0.2, seed=3)


@pytest.fixture(scope="module")
def task():
    return tiny_ctr_task()


def model(seed=0):
    torch.manual_seed(seed)  # dropout makes the run depend on the RNG stream too
    return build({"arch": "deepfm", "config": {**TINY["deepfm"]["config"], "dropout": 0.1}})


def reference_loop(task, model, cfg, after_step=None):
    """The loop Task.train_model ran before the Trainer existed."""
    torch.manual_seed(cfg.seed)
    steps_per_epoch = math.ceil(len(task.splits["train"]) / cfg.batch_size)
    total = math.ceil(cfg.epochs * steps_per_epoch)
    opt = torch.optim.AdamW(task.param_groups(model, cfg), weight_decay=cfg.weight_decay, foreach=True)
    warm = int(cfg.warmup_ratio * total)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / max(1, warm) if s < warm else max(0.0, (total - s) / max(1, total - warm)))
    model.train()
    step, epoch, losses = 0, 0, []
    while step < total:
        for x, y in task.batches("train", cfg.batch_size, shuffle=True, seed=cfg.seed + epoch):
            loss = task.loss(model(*x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            opt.step()
            sched.step()
            if after_step is not None:
                after_step(model)
            losses.append(loss.item())
            step += 1
            if step >= total:
                break
        epoch += 1
    return float(np.mean(losses[-50:]))


def same_weights(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


class HiddenMSE(LossTerm):
    name, weight = "hidden", 0.5

    def __call__(self, batch, model):
        return batch.hidden["mlp.0"].pow(2).mean()


class Stop(Exception):
    pass


class Recorder(Callback):
    def __init__(self, task, stop_at=None):
        self.task, self.stop_at, self.events = task, stop_at, []

    def on_start(self, trainer):
        self.events.append("start")

    def on_batch_start(self, trainer, batch_inputs):
        if trainer.step == self.stop_at:
            raise Stop

    def on_step_end(self, trainer):
        b, train = trainer.batch, self.task.splits["train"]
        assert all(torch.equal(t[b.index], x) for t, x in zip(train.inputs, b.inputs))
        assert torch.equal(train.labels[b.index], b.labels) and b.step == trainer.step - 1
        self.events.append(b.index)

    def on_end(self, trainer):
        self.events.append("end")


@pytest.mark.parametrize("masked", [False, True])
def test_default_run_equals_the_reference_loop(task, masked):
    mask = {"mlp.0.weight": torch.rand(16, 14) > 0.5}

    def after(m):
        with torch.no_grad():
            m.mlp[0].weight.mul_(mask["mlp.0.weight"])

    a, b = model(), model()
    final = reference_loop(task, a, CFG, after if masked else None)
    rec = task.train_model(b, CFG, progress=False, after_step=after if masked else None)
    assert same_weights(a, b)
    assert rec["final_loss"] == final and rec["terms"]["task"] == final
    assert rec["steps"] == 20 and rec["epochs"] == 2.5 and rec["resumed_from_step"] is None
    assert set(rec["val"]) == {"auc", "logloss"}


def test_extra_term_changes_weights_and_is_logged(task):
    a, b = model(), model()
    task.train_model(a, CFG, progress=False)
    rec = task.train_model(b, CFG, progress=False, terms=[*Trainer(task, b, CFG).terms, HiddenMSE()],
                           capture=["mlp.0"])
    assert not same_weights(a, b)
    assert rec["terms"]["hidden"] > 0
    assert rec["final_loss"] == pytest.approx(rec["terms"]["task"] + 0.5 * rec["terms"]["hidden"], rel=1e-5)
    assert not b.mlp[0]._forward_hooks


def test_callbacks_run_once_per_step_with_the_batch_rows(task):
    cb = Recorder(task)
    rec = Trainer(task, model(), CFG, callbacks=[cb], progress=False).fit()
    assert cb.events[0] == "start" and cb.events[-1] == "end" and len(cb.events) == rec["steps"] + 2
    first_epoch = torch.cat(cb.events[1:9])  # 120 rows / 16 = 8 steps, the rows in Task.batches order
    assert sorted(first_epoch.tolist()) == list(range(120))
    ref = torch.cat([x[0] for x, _ in task.batches("train", 16, shuffle=True, seed=CFG.seed)])
    assert torch.equal(task.splits["train"].inputs[0][first_epoch], ref)


def test_resume_gives_the_weights_of_an_uninterrupted_run(task, tmp_path):
    full = model()
    want = Trainer(task, full, CFG, progress=False).fit()
    with pytest.raises(Stop):  # interrupted mid-epoch, after the step-10 checkpoint
        Trainer(task, model(), CFG, callbacks=[Recorder(task, stop_at=11)], checkpoint_dir=tmp_path,
                checkpoint_every=5, progress=False).fit()
    resumed = model(seed=7)
    got = Trainer(task, resumed, CFG, checkpoint_dir=tmp_path, checkpoint_every=5, progress=False).fit()
    assert got["resumed_from_step"] == 10 and got["steps"] == 20
    assert same_weights(full, resumed) and got["final_loss"] == want["final_loss"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["trainer.json", "trainer.safetensors"]

    with pytest.raises(UsageError, match="another training configuration"):
        Trainer(task, model(), CFG.model_copy(update={"lr": 1e-2}), checkpoint_dir=tmp_path)


def test_unknown_capture_layer_is_a_usage_error(task):
    with pytest.raises(UsageError, match="mlp.9") as err:
        Trainer(task, model(), CFG, capture=["mlp.9"])
    assert "Did you mean: mlp.6" in str(err.value) and "Layers include: embeddings" in str(err.value)


def test_convolutional_models_train_channels_last_and_come_back_contiguous(monkeypatch):
    """Image convnets train in the channels-last layout (faster NHWC kernels): the same weights as
    the default layout up to summation order, and the layout is put back after training."""
    from slimcart.tasks.base import Split
    from slimcart.tasks.product_image import ProductImageTask
    import slimcart.trainer as trainer_mod

    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(48, 3, 16, 16, generator=g), torch.randint(0, 4, (48,), generator=g)
    images = ProductImageTask(dataset="tiny", splits={"train": Split((x[:40],), y[:40]), "val": Split((x[40:],), y[40:]),
                                                      "test": Split((x[40:],), y[40:])},
                              info={"num_classes": 4, "classes": list("abcd"), "input_shape": [3, 16, 16]})
    spec = dict(TINY["cnn"], config={**TINY["cnn"]["config"], "in_channels": 3, "image_size": 16, "num_classes": 4})
    cfg = TrainConfig(epochs=2, batch_size=8, lr=3e-3, weight_decay=0.0, warmup_ratio=0.0, seed=1)
    runs = {}
    for layout in (True, False):
        torch.manual_seed(0)
        net = build(spec)
        with monkeypatch.context() as m:
            m.setattr(trainer_mod, "use_channels_last", lambda *a, layout=layout: layout)
            rec = Trainer(images, net, cfg, progress=False).fit()
        assert rec["memory_format"] == ("channels_last" if layout else "contiguous")
        assert all(p.is_contiguous() for p in net.parameters())  # the default layout again
        runs[layout] = net.state_dict()
    for k, v in runs[True].items():
        torch.testing.assert_close(v, runs[False][k], atol=1e-4, rtol=1e-3)
    photos = torch.rand(2, 3, 64, 64)
    assert trainer_mod.use_channels_last(build(spec), (photos,), 1)
    assert not trainer_mod.use_channels_last(build(spec), (photos,), 2)  # collectives want the default layout
    assert not trainer_mod.use_channels_last(build(spec), (x,), 1)  # 16 px: no gain measured
    assert not trainer_mod.use_channels_last(model(), (torch.zeros(4, 3, dtype=torch.long),), 1)
