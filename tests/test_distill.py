"""Distillation: each loss against hand-computed values, the student builders, the teacher cache,
the bad-input errors, and the stage end to end on tiny models (a student that learns its teacher)."""
import copy
import math

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from slimcart import artifact
from slimcart.distill import losses
from slimcart.distill.students import StudentConfig, default_map, make_student
from slimcart.distill.teacher import teacher_outputs
from slimcart.distill.technique import DistillConfig, distill
from slimcart.errors import ModelError, UsageError
from slimcart.models import build
from slimcart.recipe import Recipe
from slimcart.stage import ModelState, StageContext
from slimcart.tasks.base import Split
from slimcart.tasks.ctr import CTRTask
from slimcart.tasks.intent import IntentTask
from tests.tiny import TINY, tiny, tiny_inputs

TEXT3 = {"arch": "text_classifier", "config": {"num_labels": 3, "encoder": {
    **TINY["text"]["config"]["encoder"], "num_hidden_layers": 3}}}


def image_task(rows: int, side: int, train: int, val: int):
    """A tiny 5-class product_image task of random RGB images: rows [0, train) train, then val, then test."""
    from slimcart.tasks.product_image import ProductImageTask

    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(rows, 3, side, side, generator=g), torch.randint(0, 5, (rows,), generator=g)
    full, idx = Split((x,), y), torch.arange(rows)
    return ProductImageTask(dataset="tiny", splits={"train": full.take(idx[:train]), "val": full.take(idx[train:val]),
                                                    "test": full.take(idx[val:])},
                            info={"num_classes": 5, "classes": list("abcde"), "input_shape": [3, side, side]})


# ---- losses -------------------------------------------------------------------------------
def test_soft_kl_matches_hand_computed_values():
    s, t = torch.tensor([[0.0, 0.0]]), torch.tensor([[math.log(3.0), 0.0]])
    kl1 = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert losses.soft_kl(s, t, 1.0).item() == pytest.approx(kl1, rel=1e-6)
    p = math.sqrt(3) / (math.sqrt(3) + 1)  # softmax([ln3 / 2, 0])
    kl2 = p * math.log(p / 0.5) + (1 - p) * math.log((1 - p) / 0.5)
    assert losses.soft_kl(s, t, 2.0).item() == pytest.approx(4 * kl2, rel=1e-6)
    assert losses.soft_kl(t, t, 3.0).item() == pytest.approx(0.0, abs=1e-7)


def test_soft_bce_and_pairwise_rank_match_hand_computed_values():
    assert losses.soft_bce(torch.tensor([0.0]), torch.tensor([0.0]), 1.0).item() == pytest.approx(math.log(2))
    y, sig = 1 / (1 + math.exp(-2)), 1 / (1 + math.exp(-1))
    bce = -(y * math.log(sig) + (1 - y) * math.log(1 - sig))
    s, t = torch.tensor([1.0, 0.0]), torch.tensor([2.0, 0.0])
    assert losses.pairwise_rank(s, t, None, 1.0).item() == pytest.approx(bce, rel=1e-6)
    assert losses.pairwise_rank(s, t, torch.tensor([0, 1]), 1.0).item() == 0.0  # no pair shares a group
    # three rows, two groups: only the pair (0, 2) counts
    s3, t3 = torch.tensor([1.0, 5.0, 0.0]), torch.tensor([2.0, -3.0, 0.0])
    assert losses.pairwise_rank(s3, t3, torch.tensor([7, 8, 7]), 1.0).item() == pytest.approx(bce, rel=1e-6)


def test_hidden_mse_counts_only_valid_positions():
    s, t = torch.zeros(1, 3, 2), torch.tensor([[[1.0, 1.0], [2.0, 2.0], [9.0, 9.0]]])
    assert losses.hidden_mse(s, t, torch.tensor([[1, 1, 0]])).item() == pytest.approx((1 + 1 + 4 + 4) / 4)
    assert losses.hidden_mse(s, t).item() == pytest.approx((2 + 8 + 162) / 6)


def test_relation_heads_divide_both_widths():
    # 4 student heads of 32 against the teacher's 12 of 32: 12 does not divide 128, 8 is the most that does
    assert losses.relation_heads(12, 128, 384) == 8
    assert losses.relation_heads(12, 192, 384) == 12 and losses.relation_heads(12, 384, 384) == 12
    assert losses.relation_heads(4, 0, 64) == 4


def test_relation_kl_matches_hand_computed_values():
    a, zero = torch.tensor([[[1.0], [0.0]]]), torch.zeros(1, 2, 1)
    # student rows: softmax([1, 0]) and softmax([0, 0]); teacher rows: uniform
    q = 1 / (1 + math.exp(-1))
    row0 = 0.5 * math.log(0.5 / q) + 0.5 * math.log(0.5 / (1 - q))
    assert losses.relation_kl((a, a), (zero, zero), 1).item() == pytest.approx(row0 / 2, rel=1e-6)
    # with the second position masked out: one valid key per row, so both relations are [1]
    assert losses.relation_kl((a, a), (zero, zero), 1, torch.tensor([[1, 0]])).item() == pytest.approx(0, abs=1e-7)
    x = torch.randn(2, 5, 8)
    assert losses.relation_kl((x, x), (x, x), 4).item() == pytest.approx(0, abs=1e-6)
    with pytest.raises(ValueError, match="relation heads 3"):
        losses.relation_kl((x, x), (x, x), 3)


# ---- students -----------------------------------------------------------------------------
def test_transformer_student_copies_the_mapped_layers():
    torch.manual_seed(0)
    teacher = build(TEXT3).eval()
    st = make_student(teacher, TEXT3, StudentConfig(layers=2, layer_map=[0, 2]))
    assert st.spec["config"]["encoder"]["num_hidden_layers"] == 2
    assert len(st.module.encoder.encoder.layer) == 2
    ts, ss = teacher.state_dict(), st.module.state_dict()
    for k, v in ss.items():
        src = k.replace("layer.1.", "layer.2.") if ".layer.1." in k else k
        assert torch.equal(v, ts[src]), k
    assert st.layer_pairs == {"encoder.encoder.layer.0": "encoder.encoder.layer.0",
                              "encoder.encoder.layer.1": "encoder.encoder.layer.2"}
    again = build(st.spec)
    again.load_state_dict(ss, strict=True)  # the spec rebuilds the student
    assert default_map(6, 2) == [2, 5] and default_map(6, 3) == [1, 3, 5] and default_map(6, 1) == [5]


def test_cnn_and_deepfm_students_have_the_asked_shapes():
    cnn = make_student(tiny("cnn"), TINY["cnn"], StudentConfig(width=0.5, blocks=[1, 2, 1]))
    assert cnn.spec["config"]["widths"] == [2, 4, 4] and cnn.spec["config"]["blocks"] == [1, 2, 1]
    assert cnn.module.fc.in_features == 4 and len(cnn.module.layers) == 4
    assert cnn.layer_pairs == {"layers.0": "layers.0", "layers.2": "layers.1", "layers.3": "layers.2"}
    fm = make_student(tiny("deepfm"), TINY["deepfm"], StudentConfig(embed_dim=2, hidden=[8]))
    assert fm.module.embeddings[0].embedding_dim == 2
    assert [m.out_features for m in fm.module.mlp if isinstance(m, torch.nn.Linear)] == [8, 1]
    assert fm.module(*tiny_inputs("deepfm", 5)).shape == (5,)


def test_student_errors_name_the_key():
    teacher = build(TEXT3)
    with pytest.raises(UsageError, match=r"student.layer_map names layer 5.*0\.\.2"):
        make_student(teacher, TEXT3, StudentConfig(layers=2, layer_map=[0, 5]))
    with pytest.raises(UsageError, match="student.layers is 4 but the teacher has only 3"):
        make_student(teacher, TEXT3, StudentConfig(layers=4))
    with pytest.raises(UsageError, match="student.width does not apply to a transformer"):
        make_student(teacher, TEXT3, StudentConfig(layers=1, width=0.5))
    with pytest.raises(UsageError, match="needs student.layers"):
        make_student(teacher, TEXT3, StudentConfig())
    with pytest.raises(UsageError, match="already transformed"):
        make_student(teacher, {**TEXT3, "reshape": {"x": 1}}, StudentConfig(layers=1))


@pytest.mark.parametrize("cfg, key", [({"temperature": 0}, "temperature"), ({"alpha": 1.5}, "alpha"),
                                      ({"alpha": -0.1}, "alpha"), ({"epochs": 0}, "epochs")])
def test_config_errors_name_the_key(cfg, key):
    with pytest.raises(ValidationError, match=key):
        DistillConfig(student={"layers": 1}, **cfg)
    from slimcart.errors import RecipeError
    with pytest.raises(RecipeError, match=f"stages.0.*{key}"):
        Recipe.from_dict({"version": 1, "stages": [{"type": "distill", "student": {"layers": 1}, **cfg}]})


# ---- the stage on a tiny task ----------------------------------------------------------------
def text_task(n=400, seed=0):
    """A task whose label is which of three token ranges is most frequent in the text."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 100, (n, 12), generator=g)
    lengths = torch.randint(6, 13, (n,), generator=g)
    mask = (torch.arange(12)[None, :] < lengths[:, None]).long()
    ids = ids * mask
    y = torch.stack([((ids >= lo) & (ids < lo + 32) & mask.bool()).sum(1) for lo in (4, 36, 68)], 1).argmax(1)
    full = Split((ids, mask), y)
    parts = torch.arange(n)
    splits = {"train": full.take(parts[:300]), "val": full.take(parts[300:350]), "test": full.take(parts[350:])}
    return IntentTask(dataset="tiny", splits=splits, info={"num_classes": 3, "classes": ["a", "b", "c"]})


@pytest.fixture(scope="module")
def trained_teacher():
    task = text_task()
    torch.manual_seed(0)
    teacher = build(TEXT3)
    task.train_model(teacher, task.train_config("full").model_copy(update={"epochs": 8, "lr": 3e-3}),
                     progress=False)
    return task, teacher.eval()


def predictions(model, task, split="test"):
    with torch.no_grad():
        return model.eval()(*task.splits[split].inputs).argmax(1)


def test_distilled_student_learns_the_teacher(trained_teacher, tmp_path):
    task, teacher = trained_teacher
    assert task.evaluate(teacher, "test")["accuracy"] > 0.7  # the teacher has learned the rule
    state = ModelState.from_module(teacher, TEXT3)
    cfg = DistillConfig(student={"layers": 1}, epochs=6, lr=3e-3, alpha=0.2, temperature=2.0,
                        hidden_loss=1.0, attention_loss=0.5)
    report = distill(state, cfg, StageContext(task=task, workdir=tmp_path, progress=False))
    student = state.torch_model
    assert state.spec["config"]["encoder"]["num_hidden_layers"] == 1
    assert not hasattr(student, "distill_adapters")
    assert set(report.stats["terms"]) == {"task", "soft", "hidden", "attention"}
    assert report.stats["params_student"] < report.stats["params_teacher"]
    agree_after = (predictions(student, task) == predictions(teacher, task)).float().mean().item()
    assert agree_after >= 0.8
    assert report.stats["student_val"]["accuracy"] >= report.stats["student_val_before"]["accuracy"]
    # the saved student reloads from its spec, strictly
    folder = artifact.save(state, tmp_path / "student", task={"name": "intent"},
                           examples=task.example_inputs(2, "val"), input_names=task.input_names)
    again = artifact.load(folder).torch_model
    x = task.example_inputs(4, "test")
    torch.testing.assert_close(again(*x), student(*x))


def test_teacher_outputs_are_computed_once(trained_teacher):
    task, teacher = trained_teacher
    a = teacher_outputs(teacher, task, ["encoder.encoder.layer.2"])
    b = teacher_outputs(teacher, task, ["encoder.encoder.layer.2"])
    assert a is b and a.hidden["encoder.encoder.layer.2"].shape == (300, 12, 32)
    with torch.no_grad():
        torch.testing.assert_close(a.logits[:5], teacher(*(t[:5] for t in task.splits["train"].inputs)))


def test_distill_refuses_a_student_of_other_classes(trained_teacher, tmp_path, monkeypatch):
    task, teacher = trained_teacher
    from slimcart.distill import technique
    from slimcart.distill.students import Student

    wrong = {"arch": "text_classifier", "config": {**TEXT3["config"], "num_labels": 5}}
    monkeypatch.setattr(technique, "make_student", lambda *a: Student(build(wrong), wrong))
    with pytest.raises(ModelError, match=r"teacher predicts \(3,\) outputs per row and the student \(5,\)"):
        distill(ModelState.from_module(teacher, TEXT3), DistillConfig(student={"layers": 1}),
                StageContext(task=task, workdir=tmp_path, progress=False))


def ctr_task(n=600):
    g = np.random.default_rng(0)
    sparse = np.stack([g.integers(0, v, n) for v in (50, 7, 300)], 1)
    dense = g.normal(size=(n, 2))
    y = (g.random(n) < 1 / (1 + np.exp(-(sparse[:, 1] - 3) * 2.0))).astype(np.float32)
    info = {"dense": ["d0", "d1"], "vocab_sizes": [50, 7, 300], "categorical": ["user", "cat", "item"]}
    return CTRTask._from_arrays("t", sparse, dense, y, (np.arange(400), np.arange(400, 500), np.arange(500, 600)), info)


def test_ctr_student_with_pairwise_ranking(tmp_path):
    task = ctr_task()
    torch.manual_seed(0)
    teacher = build(TINY["deepfm"])
    task.train_model(teacher, task.train_config("full").model_copy(update={"epochs": 5, "batch_size": 32, "lr": 0.01}),
                     progress=False)
    state = ModelState.from_module(teacher.eval(), TINY["deepfm"])
    cfg = DistillConfig(student={"embed_dim": 1, "hidden": [8]}, epochs=5, batch_size=32, lr=0.01, alpha=0.5, ranking_loss=1.0,
                        group_field="user")
    report = distill(state, cfg, StageContext(task=task, workdir=tmp_path, progress=False))
    # the task's own row regulariser (ctr: frequency-aware L2) trains the student too
    assert report.stats["soft_loss"] == "bce" and set(report.stats["terms"]) == {"task", "soft", "ranking", "row_l2"}
    assert state.spec["config"]["embed_dim"] == 1
    assert report.stats["teacher_val"]["auc"] > 0.8
    assert report.stats["student_val"]["auc"] > report.stats["teacher_val"]["auc"] - 0.05
    with pytest.raises(UsageError, match="group_field 'shop' is not a categorical field"):
        distill(ModelState.from_module(teacher, TINY["deepfm"]),
                DistillConfig(student={"embed_dim": 2}, group_field="shop"),
                StageContext(task=task, workdir=tmp_path, progress=False))


class FakeTokenizer:
    mask_token_id, all_special_ids = 3, [0, 1, 2, 3]


def test_narrow_student_with_masked_copies(trained_teacher, tmp_path):
    task, teacher = trained_teacher
    state = ModelState.from_module(teacher, TEXT3)
    cfg = DistillConfig(student={"layers": 2, "heads_ratio": 0.5, "ffn_ratio": 0.5}, epochs=2, lr=3e-3,
                        hidden_loss=1.0, attention_loss=1.0, augment_mask=0.2)
    with pytest.raises(UsageError, match="augment_mask is for text tasks whose tokenizer has a"):
        distill(ModelState.from_module(teacher, TEXT3), cfg, StageContext(task=task, workdir=tmp_path, progress=False))
    task.tokenizer = FakeTokenizer()
    try:
        report = distill(state, cfg, StageContext(task=task, workdir=tmp_path, progress=False))
    finally:
        task.tokenizer = None
    assert set(report.stats["terms"]) == {"task", "soft", "hidden", "attention", "masked_copy"}
    layer = state.torch_model.encoder.encoder.layer[0]
    assert layer.attention.self.num_attention_heads == 2 and layer.intermediate.dense.out_features == 32
    assert "reshape" in state.spec and state.spec["config"]["encoder"]["num_hidden_layers"] == 2
    narrow = report.stats["student_narrowed"]
    assert narrow["params_after"] < narrow["params_before"]
    folder = artifact.save(state, tmp_path / "narrow", task={"name": "intent"},
                           examples=task.example_inputs(2, "val"), input_names=task.input_names)
    x = task.example_inputs(4, "test")
    torch.testing.assert_close(artifact.load(folder).torch_model(*x), state.torch_model(*x))


def test_narrow_student_ranks_by_taylor_importance(trained_teacher, tmp_path):
    """student.importance: taylor narrows the built student exactly as head_prune ranks it by gradients."""
    from slimcart.distill.technique import _shrink
    from slimcart.prune.structured import HeadPruneConfig, head_prune
    from slimcart.stage import StageReport

    task, teacher = trained_teacher
    scfg = StudentConfig(layers=2, heads_ratio=0.5, ffn_ratio=0.5, importance="taylor")
    with pytest.raises(UsageError, match="student.importance does not apply to a cnn"):
        make_student(build(TINY["cnn"]), TINY["cnn"], StudentConfig(width=0.5, importance="taylor"))
    built, report = make_student(teacher, TEXT3, scfg), StageReport("distill", {})
    ref = ModelState.from_module(copy.deepcopy(built.module), copy.deepcopy(built.spec))
    torch.manual_seed(0)
    _shrink(built, scfg, StageContext(task, tmp_path), report)
    torch.manual_seed(0)
    direct = head_prune(ref, HeadPruneConfig(heads_ratio=0.5, ffn_ratio=0.5, importance="taylor"),
                        StageContext(task, tmp_path))
    direct_state = ref
    assert report.changed == {k: f"student: {v}" for k, v in direct.changed.items()}
    kept, ref_kept = built.module.state_dict(), direct_state.torch_model.state_dict()
    assert all(torch.equal(kept[k], ref_kept[k]) for k in kept)
    by_magnitude = make_student(teacher, TEXT3, scfg)
    _shrink(by_magnitude, scfg.model_copy(update={"importance": "magnitude"}), StageContext(task, tmp_path),
            StageReport("distill", {}))
    other = by_magnitude.module.state_dict()
    assert other.keys() == kept.keys()
    assert not all(torch.equal(kept[k], other[k]) for k in kept)  # the gradients keep other neurons here
    layer = built.module.encoder.encoder.layer[1]
    assert layer.attention.self.num_attention_heads == 2 and layer.intermediate.dense.out_features == 32


def test_pretrained_image_student_is_the_channel_pruned_teacher(tmp_path):
    from slimcart.distill.technique import _shrink
    from slimcart.stage import StageReport

    class Images:
        name, input_names = "product_image", ("image",)

        def example_inputs(self, batch, split="val"):
            return (torch.randn(batch, 3, 64, 64, generator=torch.Generator().manual_seed(0)),)

    spec = {"arch": "efficientnet_lite0", "config": {"num_classes": 5, "pretrained": False}}
    torch.manual_seed(0)
    teacher = build(spec).eval()
    with pytest.raises(UsageError, match="needs student.resolution"):
        make_student(teacher, spec, StudentConfig())
    with pytest.raises(UsageError, match="student.width is 1.0"):
        make_student(teacher, spec, StudentConfig(width=1.0))
    with pytest.raises(UsageError, match="student.layers does not apply to a pruned"):
        make_student(teacher, spec, StudentConfig(layers=2, width=0.5))
    st = make_student(teacher, spec, StudentConfig(width=0.5))
    report = StageReport("distill", {})
    _shrink(st, StudentConfig(width=0.5), StageContext(Images(), tmp_path), report)
    narrow = report.stats["student_narrowed"]
    assert narrow["macs_after"] < 0.3 * narrow["macs_before"]
    again = build(st.spec)  # timm's Conv2dSame layers rebuild narrowed from the spec
    again.load_state_dict(st.module.state_dict(), strict=True)
    x = Images().example_inputs(2)
    torch.testing.assert_close(again.eval()(*x), st.module.eval()(*x))


def test_lower_resolution_student_resizes_inside_the_model(tmp_path):
    import onnxruntime as ort

    from slimcart.accelerate.onnx_export import export_onnx
    from slimcart.distill.technique import _resolution_macs
    from slimcart.stage import StageReport

    spec = {"arch": "efficientnet_lite0", "config": {"num_classes": 5, "pretrained": False}}
    torch.manual_seed(0)
    teacher = build(spec).eval()
    st = make_student(teacher, spec, StudentConfig(resolution=32))
    assert st.spec["input_resize"] == [32, 32] and "input_resize" not in spec
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        # the student is the teacher's weights on the 2x2-averaged image
        torch.testing.assert_close(st.module.eval()(x), teacher(torch.nn.functional.avg_pool2d(x, 2)))
        rebuilt = build(st.spec)
        rebuilt.load_state_dict(st.module.state_dict(), strict=True)
        torch.testing.assert_close(rebuilt.eval()(x), st.module(x))

    class Images:
        def example_inputs(self, batch, split="val"):
            return (torch.rand(batch, 3, 64, 64),)

    report = StageReport("distill", {})
    _resolution_macs(teacher, st.module, Images(), report, st.spec)
    narrow = report.stats["student_narrowed"]
    assert narrow["params_after"] == narrow["params_before"]
    assert 0.2 < narrow["macs_after"] / narrow["macs_before"] < 0.3  # a quarter of the pixels
    path = export_onnx(st.module, (x,), tmp_path / "s.onnx", ("image",), {"image": {0: "batch"}})
    got = ort.InferenceSession(str(path)).run(None, {"image": x.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(got), st.module(x).detach(), atol=1e-4, rtol=1e-4)
    with pytest.raises(UsageError, match="already transformed"):
        make_student(st.module, st.spec, StudentConfig(resolution=16))


def test_teacher_key_covers_every_tensor():
    from slimcart.distill.teacher import weights_key

    model = tiny("cnn")  # has BatchNorm's 0-dim step counters
    key = weights_key(model)
    with torch.no_grad():
        model.fc.bias[0] += 1e-3
    assert weights_key(model) != key


def test_crop_flip_copies_and_the_image_augmentation_term(tmp_path):
    from slimcart.distill.image_augment import crop_flip

    gen = torch.Generator().manual_seed(0)
    flat = torch.full((8, 3, 16, 16), 0.3)
    torch.testing.assert_close(crop_flip(flat, gen, 0.5), flat)  # a crop of a flat image is flat
    ramp = torch.linspace(0, 1, 16).expand(8, 3, 16, 16).contiguous()  # brighter to the right
    out = crop_flip(ramp, gen, 0.5)
    assert out.shape == ramp.shape and out.min() >= 0 and out.max() <= 1
    steps = out[:, 0, 8].diff(dim=-1)  # each row of each copy runs one way: kept or mirrored
    assert bool(((steps >= -1e-6).all(1) | (steps <= 1e-6).all(1)).all())
    assert bool((steps.sum(1) < 0).any() and (steps.sum(1) > 0).any())  # some mirrored, some not
    # the term on a tiny image task: the student learns from the teacher's answers on the crops
    task = image_task(90, 16, 60, 75)
    spec = dict(TINY["cnn"], config={**TINY["cnn"]["config"], "in_channels": 3, "image_size": 16})
    torch.manual_seed(0)
    teacher = build(spec)
    state = ModelState.from_module(teacher.eval(), spec)
    report = distill(state, DistillConfig(student={"width": 0.5}, epochs=1, alpha=0.5, augment_crop=0.6),
                     StageContext(task=task, workdir=tmp_path, progress=False))
    assert set(report.stats["terms"]) == {"task", "soft", "crop_copy"}
    assert report.stats["train"]["terms"]["crop_copy"] > 0
    text = ModelState.from_module(tiny("text"), TINY["text"])
    with pytest.raises(UsageError, match="augment_crop is for image classifiers"):
        distill(text, DistillConfig(student={"layers": 1}, augment_crop=0.5),
                StageContext(task=text_task(), workdir=tmp_path, progress=False))


def test_mixup_blends_each_copy_with_another_photo_of_the_batch(tmp_path):
    from slimcart.distill.image_augment import mix

    x = torch.arange(6, dtype=torch.float32).view(6, 1, 1, 1).expand(6, 3, 4, 4).contiguous()
    out = mix(x, np.random.default_rng(0), 1.0)
    rng = np.random.default_rng(0)  # the same draws by hand
    lam, perm = rng.beta(1.0, 1.0, 6), rng.permutation(6)
    want = torch.tensor([lam[i] * i + (1 - lam[i]) * perm[i] for i in range(6)], dtype=torch.float32)
    torch.testing.assert_close(out[:, 0, 0, 0], want)
    assert bool((out == out[:, :1, :1, :1]).all())  # one weight per image, over all its pixels
    assert not torch.allclose(out, x)
    with pytest.raises(ValidationError, match="augment_mixup blends the crop copies"):
        DistillConfig(student={"width": 0.5}, augment_mixup=1.0)


def test_image_student_matches_pooled_features_on_the_crop_copies(tmp_path):
    """hidden_loss of a pretrained image student: its pooled features against the teacher's, on the
    stored photos (cached) and on each crop copy, where the term adds the MSE to the soft KL by hand."""
    from slimcart.distill.image_augment import CropFlipCopy, crop_flip
    from slimcart.trainer import Batch

    spec = {"arch": "efficientnet_lite0", "config": {"num_classes": 5, "pretrained": False}}
    torch.manual_seed(0)
    teacher = build(spec).eval()
    st = make_student(teacher, spec, StudentConfig(resolution=32))
    assert st.layer_pairs == {"global_pool": "global_pool"}
    student = st.module.eval()
    x = torch.rand(4, 3, 48, 48)
    hidden: dict = {}
    hook = student.global_pool.register_forward_hook(lambda _m, _a, o: hidden.__setitem__("global_pool", o))
    term = CropFlipCopy(teacher, 0.6, 2.0, 0.7, seed=3, pairs=st.layer_pairs, hidden_weight=0.5)
    got = term(Batch((x,), torch.zeros(4, dtype=torch.long), None, 0, 0, hidden, torch.arange(4)), student)
    hook.remove()
    crops = crop_flip(x, torch.Generator().manual_seed(3), 0.6)  # the same draws by hand
    feats = {}
    with torch.no_grad():
        h1 = teacher.global_pool.register_forward_hook(lambda _m, _a, o: feats.__setitem__("t", o))
        t_logits = teacher(crops)
        h1.remove()
        h2 = student.global_pool.register_forward_hook(lambda _m, _a, o: feats.__setitem__("s", o))
        s_logits = student(crops)
        h2.remove()
    want = losses.soft_kl(s_logits, t_logits, 2.0) + (0.5 / 0.7) * ((feats["s"] - feats["t"]) ** 2).mean()
    torch.testing.assert_close(got.detach(), want, atol=1e-4, rtol=1e-4)
    # end to end: the hidden term on the stored photos, the crop copies carrying the features too
    task = image_task(40, 48, 24, 32)
    state = ModelState.from_module(teacher, spec)
    report = distill(state, DistillConfig(student={"resolution": 32}, epochs=1, alpha=0.3, hidden_loss=0.5,
                                          augment_crop=0.6, batch_size=8),
                     StageContext(task=task, workdir=tmp_path, progress=False))
    assert report.stats["terms"] == {"task": 0.3, "soft": 0.7, "hidden": 0.5, "crop_copy": 0.7}
    assert report.stats["layer_pairs"] == {"global_pool": "global_pool"}
    assert report.stats["train"]["terms"]["hidden"] > 0
