"""The teacher's outputs on the training split, computed once and reused by every epoch, every
student and every trial of a search in this process.

Rows are in the split's order, so a training batch reads its targets by its row indices. The
teacher runs on the split's stored inputs (text: padded to the task's full length), so a loss on
hidden states takes the first L positions of a batch collated to length L. Hidden states are kept
in float16 (half the memory; their rounding error, ~1e-3 relative, is far below the gap between a
student's and its teacher's states). The cache is keyed by the teacher's weights and the task's data
fingerprint, so a changed teacher or dataset never reads stale targets.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

_CACHE: dict[str, "TeacherOutputs"] = {}
_KEEP = 2  # teachers kept in memory


@dataclass
class TeacherOutputs:
    logits: Tensor
    hidden: dict[str, Tensor] = field(default_factory=dict)
    seconds: float = 0.0


def weights_key(model: nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        a = t.detach().cpu().contiguous()
        h.update(f"{name}:{a.dtype}:{tuple(a.shape)};".encode())
        h.update(a.reshape(-1).view(torch.uint8).numpy().tobytes() if a.numel() else b"")
    return h.hexdigest()


def _output(out):
    return out if isinstance(out, Tensor) else out[0]


def teacher_outputs(teacher: nn.Module, task, names: list[str], batch_size: int = 128) -> TeacherOutputs:
    """Logits and the outputs of the modules ``names`` for every training row."""
    import time

    key = weights_key(teacher) + task.fingerprint()
    have = _CACHE.get(key)
    missing = [n for n in names if have is None or n not in have.hidden]
    if have is not None and not missing:
        return have
    modules = dict(teacher.named_modules())
    data = task.splits["train"]
    n = len(data)
    grabbed: dict[str, Tensor] = {}
    hooks = [modules[m].register_forward_hook(lambda _m, _a, o, m=m: grabbed.__setitem__(m, _output(o)))
             for m in missing]
    logits, hidden = [], {m: [] for m in missing}
    t0 = time.perf_counter()
    teacher.eval()
    try:
        with torch.inference_mode():
            for start in range(0, n, batch_size):
                x = tuple(t[start:start + batch_size] for t in data.inputs)
                logits.append(teacher(*x).float())
                for m in missing:
                    hidden[m].append(grabbed[m].to(torch.float16))
    finally:
        for h in hooks:
            h.remove()
    out = have or TeacherOutputs(torch.cat(logits))
    out.hidden.update({m: torch.cat(v) for m, v in hidden.items()})
    out.seconds += time.perf_counter() - t0
    _CACHE[key] = out
    while len(_CACHE) > _KEEP:
        _CACHE.pop(next(iter(_CACHE)))
    return out
