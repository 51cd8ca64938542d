"""Shallower image students (student.blocks): which residual blocks go, the rebuilt architecture, the
MACs against the teacher, ONNX parity, and the errors that name the key."""
import onnxruntime as ort
import pytest
import torch

from slimcart.accelerate.onnx_export import export_onnx
from slimcart.distill.depth import choose_blocks
from slimcart.distill.students import StudentConfig, make_student
from slimcart.distill.technique import DistillConfig, distill
from slimcart.errors import ModelError, UsageError
from slimcart.models import build
from slimcart.models.drop_blocks import apply_kept_blocks, stages
from slimcart.stage import ModelState, StageContext
from slimcart.tasks.base import Split
from slimcart.tasks.product_image import ProductImageTask

SPEC = {"arch": "efficientnet_lite0", "config": {"num_classes": 5, "pretrained": False}}
DEPTHS = [1, 2, 2, 3, 3, 4, 1]  # EfficientNet-Lite0's blocks per stage


def images_task(n=90, side=32):
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(n, 3, side, side, generator=g), torch.randint(0, 5, (n,), generator=g)
    full, idx = Split((x,), y), torch.arange(n)
    return ProductImageTask(dataset="tiny", splits={"train": full.take(idx[:60]), "val": full.take(idx[60:75]),
                                                   "test": full.take(idx[75:])},
                            info={"num_classes": 5, "classes": list("abcde"), "input_shape": [3, side, side]})


def teacher():
    torch.manual_seed(0)
    return build(SPEC).eval()


def test_blocks_whose_removal_matters_least_go():
    t, task = teacher(), images_task()
    counts = [1, 1, 2, 2, 1, 2, 1]
    kept, scores = choose_blocks(t, counts, task)
    assert [len(k) for k in kept] == counts and all(k[0] == 0 for k in kept)
    assert set(scores) == {f"blocks.{s}.{i}" for s, d in enumerate(DEPTHS) for i in range(1, d)}
    for s, k in enumerate(kept):  # every kept residual block scores above every removed one
        gone = [scores[f"blocks.{s}.{i}"] for i in range(1, DEPTHS[s]) if i not in k]
        stay = [scores[f"blocks.{s}.{i}"] for i in k[1:]]
        assert not gone or not stay or min(stay) >= max(gone)
    # by hand: skipping blocks.5.1 alone moves the predictions by its score
    x = next(iter(task.batches("train", 64, shuffle=True, limit=64)))[0]
    with torch.no_grad():
        ref = t(*x)
        block, t.blocks[5][1] = t.blocks[5][1], torch.nn.Identity()
        out = t(*x)
        t.blocks[5][1] = block
    kl = torch.nn.functional.kl_div(out.log_softmax(-1), ref.log_softmax(-1), log_target=True, reduction="batchmean")
    assert scores["blocks.5.1"] == pytest.approx(float(kl), abs=1e-5)


def test_shallow_student_rebuilds_from_its_spec_and_exports(tmp_path):
    t, task = teacher(), images_task()
    state = ModelState.from_module(t, SPEC)
    report = distill(state, DistillConfig(student={"blocks": [1, 1, 1, 1, 1, 1, 1], "resolution": 24}, epochs=1),
                     StageContext(task=task, workdir=tmp_path, progress=False))
    student, spec = state.torch_model, state.spec
    assert [len(s) for _, s in stages(student)] == [1] * 7 and spec["kept_blocks"] == [[0]] * 7
    assert spec["input_resize"] == [24, 24] and "kept_blocks" not in SPEC
    narrow = report.stats["student_narrowed"]
    assert narrow["params_after"] < 0.75 * narrow["params_before"]
    assert narrow["macs_after"] < 0.5 * narrow["macs_before"]
    assert report.stats["student_blocks"]["kept"]["blocks.5"] == [0]
    again = build(spec)
    again.load_state_dict(student.state_dict(), strict=True)
    x = task.example_inputs(3, "test")
    torch.testing.assert_close(again.eval()(*x), student(*x))
    path = export_onnx(student, x, tmp_path / "s.onnx", ("image",), {"image": {0: "batch"}})
    got = ort.InferenceSession(str(path)).run(None, {"image": x[0].numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(got), student(*x).detach(), atol=1e-4, rtol=1e-4)
    with pytest.raises(UsageError, match="already transformed"):
        make_student(student, spec, StudentConfig(resolution=16))


def test_the_kept_blocks_start_from_the_teacher_weights():
    t = teacher()
    st = make_student(t, SPEC, StudentConfig(blocks=[1, 2, 2, 2, 2, 2, 1]))
    assert "then shortened" in st.copied
    kept = [[0], [0, 1], [0, 1], [0, 2], [0, 1], [0, 3], [0]]
    apply_kept_blocks(st.module, kept)
    src = t.state_dict()
    for key, value in st.module.state_dict().items():
        if key.startswith("blocks."):
            s, i, rest = key.split(".", 3)[1:]
            key = f"blocks.{s}.{kept[int(s)][int(i)]}.{rest}"
        torch.testing.assert_close(value, src[key])


def test_bad_blocks_name_the_key():
    t, task = teacher(), images_task()
    with pytest.raises(UsageError, match=r"student.blocks is \[1, 1\]; the teacher has 7 stages"):
        choose_blocks(t, [1, 1], task)
    with pytest.raises(UsageError, match="from 1 to that stage's blocks"):
        choose_blocks(t, [1, 2, 2, 3, 3, 5, 1], task)
    with pytest.raises(UsageError, match="from 1 to that stage's blocks"):
        choose_blocks(t, [0, 2, 2, 3, 3, 4, 1], task)
    with pytest.raises(ModelError, match="must start with block 0"):
        apply_kept_blocks(teacher(), [[1]] + [[0]] * 6)
    with pytest.raises(ModelError, match="no stages of blocks"):
        stages(torch.nn.Sequential(torch.nn.Linear(2, 2)))
    with pytest.raises(UsageError, match="student.blocks does not apply to a transformer"):
        from tests.tiny import TINY, tiny
        make_student(tiny("text"), TINY["text"], StudentConfig(layers=1, blocks=[1]))


def test_stem_stride_student_shrinks_the_feature_maps_without_a_resize(tmp_path):
    t, task = teacher(), images_task(side=48)
    state = ModelState.from_module(t, SPEC)
    report = distill(state, DistillConfig(student={"blocks": [1] * 7, "stem_stride": 3}, epochs=1),
                     StageContext(task=task, workdir=tmp_path, progress=False))
    student, spec = state.torch_model, state.spec
    assert spec["stem_stride"] == 3 and "input_resize" not in spec
    assert student.conv_stem.stride == (3, 3) and t.conv_stem.stride == (2, 2)
    assert report.changed["conv_stem"] == "student: stride 3 (the teacher's: 2)"
    seen = {}
    student.conv_stem.register_forward_hook(lambda _m, _a, out: seen.update(stem=out.shape))
    x = task.example_inputs(3, "test")
    student(*x)
    assert seen["stem"][-2:] == (16, 16)  # 48 px at stride 3 (the teacher's stem: 24 x 24)
    narrow = report.stats["student_narrowed"]  # a third fewer rows and columns: under half the MACs of 1 block/stage
    assert narrow["macs_after"] < 0.3 * narrow["macs_before"]
    again = build(spec)
    again.load_state_dict(student.state_dict(), strict=True)
    torch.testing.assert_close(again.eval()(*x), student(*x))
    path = export_onnx(student, x, tmp_path / "s.onnx", ("image",), {"image": {0: "batch"}})
    graph = ort.InferenceSession(str(path))
    got = graph.run(None, {"image": x[0].numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(got), student(*x).detach(), atol=1e-4, rtol=1e-4)
    import onnx

    assert "Resize" not in {n.op_type for n in onnx.load(str(path)).graph.node}


def test_bad_stem_stride_names_the_key():
    with pytest.raises(Exception, match="stem_stride"):
        StudentConfig(stem_stride=1)
    student = {"hidden": [8], "stem_stride": 3}
    with pytest.raises(UsageError, match="student.stem_stride does not apply"):
        make_student(torch.nn.Linear(3, 2), {"arch": "mlp", "config": {}}, StudentConfig(**student))
