"""distill soup: k students from the same start, their weights averaged, BatchNorm recomputed."""
import pytest
import torch

from slimcart.distill.technique import DistillConfig, distill
from slimcart.models import build
from slimcart.stage import ModelState, StageContext
from tests.test_distill_depth import SPEC, images_task

STUDENT = {"blocks": [1] * 7, "resolution": 24}


def run(tmp_path, **kw):
    torch.manual_seed(0)
    teacher = build(SPEC).eval()
    state = ModelState.from_module(teacher, SPEC)
    report = distill(state, DistillConfig(student=STUDENT, epochs=1, batch_size=16, **kw),
                     StageContext(task=images_task(), workdir=tmp_path, progress=False))
    return state.torch_model, report


def test_soup_averages_the_students_and_recomputes_batchnorm(tmp_path):
    a, _ = run(tmp_path / "a", seed=0)
    b, _ = run(tmp_path / "b", seed=1)
    soup, report = run(tmp_path / "s", seed=0, soup=2)
    stats = report.stats["soup"]
    assert len(stats["students_val"]) == 2 and stats["batchnorm_recomputed"] > 0
    assert report.stats["student_val"] == stats["val"]
    assert "average of 2 students" in report.notes[-1]
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    assert not torch.equal(pa["conv_head.weight"], pb["conv_head.weight"])  # the seeds made two students
    for name, p in soup.named_parameters():
        torch.testing.assert_close(p, (pa[name] + pb[name]) / 2)
    # the first BatchNorm's statistics: those of its inputs over the training split (60 rows, one batch)
    task, seen = images_task(), {}
    hook = soup.bn1.register_forward_hook(lambda m, args, _o: seen.setdefault("x", args[0]))
    with torch.no_grad():
        soup(*next(task.batches("train", 64))[0])
    hook.remove()
    x = seen["x"]
    torch.testing.assert_close(soup.bn1.running_mean, x.mean((0, 2, 3)), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(soup.bn1.running_var, x.var((0, 2, 3), unbiased=True), atol=1e-5, rtol=1e-4)
    assert not soup.training


def test_soup_size_is_checked():
    with pytest.raises(Exception, match="soup"):
        DistillConfig(student=STUDENT, soup=0)
