import copy
import json

import pytest
import torch
from safetensors.torch import load_file

from slimcart import registry
from slimcart.prune.gradual import GradualPruneConfig, cubic_schedule, gradual_prune
from slimcart.prune.nm import CPU_KERNEL, NMPruneConfig, nm_prune
from slimcart.prune.sensitivity import (SensitivityPruneConfig, metric_drop, propose_sparsities,
                                        sensitivity_prune, sensitivity_scan)
from slimcart.stage import ModelState, StageContext
from tests.tiny import TINY, tiny

MLP = ["mlp.0", "mlp.2", "mlp.4"]


def _run(fn, model, cfg, task, tmp_path):
    state = ModelState.from_module(model, {"arch": "deepfm"})
    return fn(state, cfg, StageContext(task=task, workdir=tmp_path, stage_index=1, progress=False))


def _layers(model):
    return {n: m for n, m in model.named_modules() if n in MLP}


def test_bad_values_are_rejected():
    for bad in ({"final_sparsity": 1.0}, {"final_sparsity": 0.5, "steps": 0},
                {"final_sparsity": 0.3, "initial_sparsity": 0.5}, {"final_sparsity": 0.5, "epochs_per_step": 0}):
        with pytest.raises(ValueError):
            GradualPruneConfig(**bad)
    for bad in ({"n": 5, "m": 4}, {"n": 4, "m": 4}, {"n": 0}):
        with pytest.raises(ValueError):
            NMPruneConfig(**bad)
    for bad in ({"max_drop": -0.1}, {"max_drop": 0.1, "sparsities": [1.0]}):
        with pytest.raises(ValueError):
            SensitivityPruneConfig(**bad)
    assert {"gradual_prune", "nm_prune", "sensitivity_prune"} <= set(registry.techniques())


def test_cubic_schedule_matches_the_formula():
    got = cubic_schedule(0.1, 0.9, 4)
    assert got == pytest.approx([0.9 - 0.8 * (1 - t / 4) ** 3 for t in (1, 2, 3, 4)])
    assert got[-1] == pytest.approx(0.9) and got == sorted(got)


def test_gradual_prune_reaches_the_target_and_keeps_masks(ctr_task, ctr_model, tmp_path):
    model = copy.deepcopy(ctr_model)
    cfg = GradualPruneConfig(final_sparsity=0.8, steps=3, epochs_per_step=0.2, final_epochs=0.2,
                             layer_types=["Linear"], include=["mlp.*"])
    rep = _run(gradual_prune, model, cfg, ctr_task, tmp_path)
    assert rep.skipped["dense_linear"] == "not matched by include"
    sched = rep.stats["schedule"]
    assert [e["target_sparsity"] for e in sched] == pytest.approx(cubic_schedule(0.0, 0.8, 3))
    total = sum(m.weight.numel() for m in _layers(model).values())
    folder = tmp_path / "checkpoints" / "stage1-gradual"
    prev_zero = None
    for e in sched:
        # exact per layer (to the weight) => exact overall, and no pruned weight revived by training
        assert abs(e["achieved_sparsity"] - e["target_sparsity"]) <= len(MLP) / total
        info = json.loads((folder / f"step-{e['step']:02d}.json").read_text())
        assert info["val_metric"] == e["val_metric"] and info["metric"] == "auc"
        w = load_file(str(folder / info["weights"]))
        zero = torch.cat([(w[f"{n}.weight"] == 0).flatten() for n in MLP])
        if prev_zero is not None:
            assert bool((zero | ~prev_zero).all()), "a pruned weight came back"
            assert int(zero.sum()) >= int(prev_zero.sum())
        prev_zero = zero
    final = torch.cat([(m.weight == 0).flatten() for m in _layers(model).values()])
    assert torch.equal(final, prev_zero)  # the final fine-tune kept the mask
    assert (folder / "final.safetensors").is_file() and (folder / "final.json").is_file()
    for n, m in _layers(model).items():
        assert abs(int((m.weight == 0).sum()) - round(0.8 * m.weight.numel())) <= 1, n
        assert n in rep.changed
    assert rep.stats["sparsity"] == pytest.approx(0.8, abs=1e-3)
    assert ctr_task.evaluate(model, "val")["auc"] == pytest.approx(rep.stats["val_after"])


def _groups(w, m=4):
    return (w != 0).reshape(w.shape[0], -1, m).sum(-1)


def test_nm_prune_two_of_four_survives_finetuning(ctr_task, ctr_model, tmp_path):
    model = copy.deepcopy(ctr_model)
    assert all(bool((m.weight != 0).all()) for m in _layers(model).values())
    rep = _run(nm_prune, model, NMPruneConfig(finetune_epochs=0.2), ctr_task, tmp_path)
    assert rep.skipped["mlp.0"] == "in_features 81 not divisible by M=4"
    assert "not divisible" in rep.skipped["dense_linear"]
    assert set(rep.changed) == {"mlp.2", "mlp.4"}
    for n in ("mlp.2", "mlp.4"):
        assert bool((_groups(_layers(model)[n].weight) == 2).all()), n
    assert rep.stats["sparsity"] == pytest.approx(0.5)
    assert "val_after_finetune" in rep.stats
    if not torch.cuda.is_available():
        assert rep.stats["kernel"] == CPU_KERNEL and rep.stats["semi_structured"] is False


def test_nm_prune_keeps_the_largest_and_reports_other_layer_types():
    model = tiny("cnn")
    w = model.fc.weight.detach().clone()
    rep = nm_prune(ModelState.from_module(model, TINY["cnn"]), NMPruneConfig(use_cuda_kernels=False),
                   StageContext(task=None, workdir=None))
    assert rep.skipped["stem.0"] == "Conv2d not in layer_types" and "fc" in rep.changed
    kept = model.fc.weight.detach().abs().reshape(w.shape[0], -1, 4)
    ref = w.abs().reshape(w.shape[0], -1, 4).sort(-1).values
    assert torch.equal(kept.sort(-1).values[..., 2:], ref[..., 2:])  # the two largest stay


def test_sensitivity_scan_and_proposal(ctr_task, ctr_model, tmp_path):
    model = copy.deepcopy(ctr_model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    scan = sensitivity_scan(model, ctr_task, (0.5, 0.9), layer_types=["Linear"], include=["mlp.*"])
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # left unchanged
    assert set(scan["layers"]) == set(MLP) and scan["metric"] == "auc"
    assert all([p["sparsity"] for p in c] == [0.5, 0.9] for c in scan["layers"].values())
    max_drop = 0.003
    proposal = propose_sparsities(scan, max_drop)
    layers = _layers(model)
    for n, s in proposal.items():
        if s == 0.0:
            continue
        probe = copy.deepcopy(model)  # prune this layer alone, by hand, and re-score
        w = dict(probe.named_modules())[n].weight
        k = round(s * w.numel())
        with torch.no_grad():
            w.view(-1)[w.detach().abs().flatten().argsort(stable=True)[:k]] = 0
        assert metric_drop(scan, ctr_task.evaluate(probe, "val")["auc"]) <= max_drop + 1e-12, n
    rep = _run(sensitivity_prune, model, SensitivityPruneConfig(max_drop=max_drop, sparsities=[0.5, 0.9],
                                                                layer_types=["Linear"], include=["mlp.*"]),
               ctr_task, tmp_path)
    assert rep.stats["proposal"] == proposal and rep.stats["scan"]["layers"] == scan["layers"]
    for n, s in proposal.items():
        assert int((layers[n].weight == 0).sum()) == round(s * layers[n].weight.numel()), n


def test_nm_prune_records_the_cuda_kernel_check(monkeypatch):
    from slimcart.prune import nm

    seen = []
    monkeypatch.setattr(nm.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(nm, "_cuda_check", lambda model, names: seen.extend(names) or
                        {n: "semi-structured fp16, max |diff| vs dense 0.00e+00" for n in names})
    ctx = StageContext(task=None, workdir=None)
    rep = nm_prune(ModelState.from_module(tiny("cnn"), TINY["cnn"]), NMPruneConfig(), ctx)
    assert seen == ["fc"] and rep.stats["semi_structured"] is True
    assert set(rep.stats["cuda_layers"]) == {"fc"}
    rep = nm_prune(ModelState.from_module(tiny("cnn"), TINY["cnn"]), NMPruneConfig(use_cuda_kernels=False), ctx)
    assert rep.stats["semi_structured"] is False and "use_cuda_kernels" in rep.stats["kernel"]
