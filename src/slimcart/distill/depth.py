"""A shallower student: which residual blocks of each stage it keeps (``student.blocks``).

Each removable block is skipped alone and scored by how far the student's predictions on training
images move from its own with every block (KL of the softmax outputs, mean per image). A stage asked
to keep k blocks keeps its first block and the k - 1 whose removal moves the predictions most; the
others are removed before the student trains (distillation then recovers what they did)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UsageError
from ..models.drop_blocks import apply_kept_blocks, removable, stages


def _kl(ref: torch.Tensor, out: torch.Tensor) -> float:
    return float(F.kl_div(F.log_softmax(out.float(), -1), F.log_softmax(ref.float(), -1),
                          log_target=True, reduction="batchmean"))


def choose_blocks(model: nn.Module, counts: list[int], task, images: int = 64) -> tuple[list[list[int]], dict]:
    """Block indices to keep per stage for ``counts`` blocks per stage, and each block's skip score."""
    found = stages(model)
    sizes = [len(s) for _, s in found]
    if len(counts) != len(found) or any(not 1 <= c <= n for c, n in zip(counts, sizes)):
        raise UsageError(f"distill: student.blocks is {list(counts)}; the teacher has {len(sizes)} stages of "
                         f"{sizes} blocks: give one count per stage, from 1 to that stage's blocks.",
                         f"e.g. student: {{blocks: {[1] * len(sizes)}}} keeps the first block of each stage.")
    batch = next(iter(task.batches("train", images, shuffle=True, limit=images)))[0]
    can = removable(model, batch)
    for (name, stage), c in zip(found, counts):
        if len(stage) - c > len(can[name]):
            raise UsageError(f"distill: student.blocks asks stage {name} to keep {c} of {len(stage)} blocks, but "
                             f"only {len(can[name])} of them keep their input's shape and can be removed.",
                             f"Keep at least {len(stage) - len(can[name])} blocks in {name}.")
    model.eval()
    with torch.no_grad():
        ref = model(*batch)
        scores: dict[str, float] = {}
        for name, stage in found:
            for i in can[name]:
                block, stage[i] = stage[i], nn.Identity()
                try:
                    scores[f"{name}.{i}"] = round(_kl(ref, model(*batch)), 5)
                finally:
                    stage[i] = block
    kept = []
    for (name, stage), c in zip(found, counts):
        fixed = [i for i in range(len(stage)) if i not in can[name]]
        ranked = sorted(can[name], key=lambda i: -scores[f"{name}.{i}"])
        kept.append(sorted(fixed + ranked[:c - len(fixed)]))
    return kept, scores


def shorten(built, counts: list[int], task, report) -> None:
    """Remove the blocks ``choose_blocks`` leaves out of ``built.module``, in place, and say so."""
    sizes = {n: len(s) for n, s in stages(built.module)}
    kept, scores = choose_blocks(built.module, counts, task)
    apply_kept_blocks(built.module, kept)
    built.spec["kept_blocks"] = kept
    report.stats["student_blocks"] = {"kept": dict(zip(sizes, kept)), "skip_kl": scores}
    report.changed["blocks"] = "student: " + ", ".join(
        f"{n} keeps blocks {k} of {sizes[n]}" for n, k in zip(sizes, kept) if len(k) < sizes[n])
