"""The CTR baseline's training: row-wise Adagrad on the tables + AdamW, frequency-aware L2 on the
rows, early stopping on the validation metric (with resume)."""
import math

import pytest
import torch
import torch.nn.functional as F

from slimcart.models import build
from slimcart.optim import TablesAndAdamW, table_parameters
from slimcart.tasks.base import TrainConfig
from slimcart.tasks.ctr_reg import frequency_l2
from slimcart.trainer import Batch, EarlyStopping, Trainer
from tests.tiny import TINY, tiny_ctr_task

ROWS = TrainConfig(epochs=3, batch_size=16, lr=3e-3, table_optimizer="rowwise_adagrad", table_lr=0.1,
                   row_l2=2.0, seed=1)


@pytest.fixture(scope="module")
def task():
    return tiny_ctr_task()


def deepfm(seed=0):
    torch.manual_seed(seed)
    return build(TINY["deepfm"])


def test_adamw_groups_match_torch_adamw_step_for_step():
    torch.manual_seed(0)
    a = torch.nn.Linear(5, 3)
    b = torch.nn.Linear(5, 3)
    b.load_state_dict(a.state_dict())
    ours = TablesAndAdamW([{"params": list(a.parameters()), "lr": 1e-2}], weight_decay=0.1)
    ref = torch.optim.AdamW(b.parameters(), lr=1e-2, weight_decay=0.1)
    for step in range(5):
        x = torch.randn(4, 5, generator=torch.Generator().manual_seed(step))
        for m, opt in ((a, ours), (b, ref)):
            opt.zero_grad()
            m(x).pow(2).sum().backward()
            opt.step()
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_row_groups_touch_only_looked_up_rows_and_match_by_hand():
    table = torch.nn.Parameter(torch.randn(6, 2))
    before = table.detach().clone()
    opt = TablesAndAdamW([{"params": [table], "lr": 0.5, "rows": True}])
    ids = torch.tensor([1, 4, 4])
    F.embedding(ids, table, sparse=True).sum().backward()
    opt.step()
    g = torch.tensor([[1.0, 1.0], [2.0, 2.0]])  # row 1 looked up once, row 4 twice
    acc = g.pow(2).mean(1)
    want = before.clone()
    want[[1, 4]] -= 0.5 * g / acc.sqrt().unsqueeze(1)
    torch.testing.assert_close(table.detach(), want)
    untouched = [0, 2, 3, 5]
    assert torch.equal(table.detach()[untouched], before[untouched])
    assert torch.equal(opt.state[table]["sum"][[1, 4]], acc)


def test_frequency_l2_against_hand_computed_value(task):
    model = deepfm()
    sparse = task.splits["train"].inputs[0]
    term = frequency_l2(model, sparse, weight=3.0)
    assert term is not None and len(term.tables) == 6  # 3 second-order + 3 first-order tables
    x = (sparse[:4], task.splits["train"].inputs[1][:4])
    batch = Batch(x, task.splits["train"].labels[:4], model(*x), 0, 0, {}, torch.arange(4))
    want = 0.0
    for col in range(3):
        counts = torch.bincount(sparse[:, col], minlength=model.embeddings[col].num_embeddings).float()
        for table in (model.embeddings[col], model.linear_embeddings[col]):
            rows = x[0][:, col]
            want += float((table.weight.detach()[rows].pow(2).sum(1) / counts[rows]).sum())
    assert math.isclose(term(batch, model).item(), want / 4, rel_tol=1e-5)
    # A replaced (e.g. row-pruned) table is left out, not mis-indexed.
    model.embeddings[0] = torch.nn.Embedding(7, model.embeddings[0].embedding_dim)
    assert len(frequency_l2(model, sparse, 3.0).tables) == 5


def test_trainer_with_row_tables_and_row_l2(task):
    model = deepfm()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    tr = Trainer(task, model, ROWS, progress=False)
    assert [t.name for t in tr.terms] == ["task", "row_l2"]
    groups = tr.optimizer.param_groups
    assert [g["rows"] for g in groups] == [False, True]
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in table_parameters(model)}
    rec = tr.fit()
    assert rec["steps"] == 3 * math.ceil(120 / 16) and rec["terms"]["row_l2"] > 0
    assert not any(m.sparse for m in model.modules() if isinstance(m, torch.nn.Embedding))  # flags put back
    seen = torch.unique(task.splits["train"].inputs[0][:, 2])
    never = torch.ones(300, dtype=torch.bool)
    never[seen] = False
    assert never.any()
    w = model.embeddings[2].weight.detach()
    assert torch.equal(w[never], before["embeddings.2.weight"][never])  # rows never looked up keep their init
    assert not torch.equal(w[seen], before["embeddings.2.weight"][seen])
    assert not torch.equal(model.mlp[0].weight, before["mlp.0.weight"])


class Scores:
    """A fake validation metric: a fixed sequence of AUCs, one per call."""

    def __init__(self, task, values):
        self.task, self.values, self.calls = task, list(values), 0

    def __call__(self, model, split="test", limit=None):
        self.calls += 1
        return {"auc": self.values[self.calls - 1], "logloss": 0.0}


def test_early_stopping_stops_and_keeps_the_best_epoch(task, monkeypatch):
    model = deepfm()
    cfg = ROWS.model_copy(update={"epochs": 6, "patience": 2})
    scores = Scores(task, [0.60, 0.70, 0.65, 0.66, 0.90, 0.95, 0.5])  # the last is fit's own val
    snapshots = []
    monkeypatch.setattr(task, "evaluate", scores)
    tr = Trainer(task, model, cfg, progress=False)
    real = tr.early.on_epoch_end

    def spy(trainer):
        snapshots.append(model.mlp[0].weight.detach().clone())
        real(trainer)
    monkeypatch.setattr(tr.early, "on_epoch_end", spy)
    rec = tr.fit()
    es = rec["early_stopping"]
    assert es["val_history"] == [0.60, 0.70, 0.65, 0.66] and es["best_epoch"] == 2 and es["stopped_early"]
    assert rec["steps"] == 4 * math.ceil(120 / 16)
    assert torch.equal(model.mlp[0].weight, snapshots[1])  # epoch 2's weights are back


def test_early_stopping_state_survives_a_resume(task, tmp_path, monkeypatch):
    cfg = ROWS.model_copy(update={"epochs": 4, "patience": 3})
    steps = math.ceil(120 / 16)

    def run(stop_at=None):
        model = deepfm()
        monkeypatch.setattr(task, "evaluate", Scores(task, [0.6, 0.8, 0.7, 0.65, 0.0]))
        tr = Trainer(task, model, cfg, progress=False, checkpoint_dir=tmp_path / ("a" if stop_at else "b"),
                     checkpoint_every=steps)
        if stop_at is not None:
            tr.total = stop_at  # as if killed right after the checkpoint of epoch 2
            tr.fit()
            monkeypatch.setattr(task, "evaluate", Scores(task, [0.7, 0.65, 0.0]))
            tr = Trainer(task, deepfm(), cfg, progress=False, checkpoint_dir=tmp_path / "a",
                         checkpoint_every=steps)
            assert tr.step == 2 * steps and tr.early.history == [0.6, 0.8]
            model = tr.model
        rec = tr.fit()
        return model, rec

    resumed, rec = run(stop_at=2 * steps)
    straight, rec2 = run()
    assert rec["early_stopping"]["val_history"] == rec2["early_stopping"]["val_history"] == [0.6, 0.8, 0.7, 0.65]
    assert rec["early_stopping"]["best_epoch"] == 2
    for a, b in zip(resumed.state_dict().values(), straight.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_ctr_baseline_config_and_bad_values(task):
    cfg = task.train_config("full")
    assert (cfg.table_optimizer, cfg.row_l2 > 0, cfg.patience) == ("rowwise_adagrad", True, 2)
    assert task.train_config("test").patience is None  # a fraction of an epoch: nothing to stop
    with pytest.raises(ValueError, match="row_l2"):
        TrainConfig(row_l2=-1.0)
    with pytest.raises(ValueError, match="patience"):
        TrainConfig(patience=0)
    with pytest.raises(ValueError, match="table_optimizer"):
        TrainConfig(table_optimizer="sgd")


def test_early_stopping_direction_follows_the_task(task):
    es = EarlyStopping(task, patience=1)
    assert es._better(0.5)
    es.best = 0.6
    assert es._better(0.7) and not es._better(0.6)


def test_sharded_row_penalty_matches_the_trainer_term():
    from slimcart.parallel.train import _inverse_counts, _row_penalty

    sparse = torch.tensor([[0, 1], [0, 2], [3, 2], [0, 1]])
    inv = _inverse_counts(sparse, [4, 3], "cpu")
    assert torch.equal(inv[0], torch.tensor([1 / 3, 1.0, 1.0, 1.0]))
    rows = {"embeddings.0": torch.full((4, 2), 2.0), "linear_embeddings.1": torch.ones(4, 1)}
    # field 0: 3 lookups of id 0 (count 3) and one of id 3 (count 1), each ||row||^2 = 8;
    # field 1: ids 1, 2, 2, 1 (count 2 each), ||row||^2 = 1.
    want = 3 * 8 / 3 + 8 / 1 + 4 * 1 / 2
    assert math.isclose(float(_row_penalty(rows, sparse, inv)), want, rel_tol=1e-6)
