"""``distill``: the current model becomes the teacher of a smaller student, which replaces it.

Loss = alpha * task loss + (1 - alpha) * soft loss (``soft_kl``; ``soft_bce`` for one-logit CTR
models) + hidden_loss * mean hidden-state MSE over the mapped layers (through a learned linear or
1x1-conv adapter where the widths differ) + attention_loss * MiniLM relation KL on the last layer
(attention distributions Q-K and value relation V-V) + ranking_loss * pairwise ranking distillation
(within the groups of ``group_field``, else within the batch). The teacher's outputs are computed
once (``teacher.py``); the student trains with the task's optimizer and schedule (``Trainer``),
data-parallel in a torch.distributed group (ranking pairs then form within each rank's share of a
batch), with per-epoch checkpoints when the stage context has a checkpoint folder.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from ..errors import ModelError, UsageError
from ..registry import TORCH, TechniqueConfig, register
from ..stage import ModelState, StageContext, StageReport
from ..trainer import Batch, LossTerm, TaskLoss
from . import losses
from .losses import adapter_key
from .students import StudentConfig, make_student
from .teacher import TeacherOutputs, teacher_outputs


class DistillConfig(TechniqueConfig):
    student: StudentConfig
    epochs: float = Field(default=3.0, gt=0)
    lr: float | None = Field(default=None, gt=0, description="None: the task's fine-tuning rate")
    batch_size: int | None = Field(default=None, ge=1)
    alpha: float = Field(default=0.5, ge=0.0, le=1.0, description="weight of the task (hard-label) loss")
    temperature: float = Field(default=2.0, gt=0.0)
    hidden_loss: float = Field(default=0.0, ge=0.0, description=(
        "weight of the hidden-state MSE over the student's layer pairs (pretrained image students: "
        "the pooled features, also on the crop copies)"))
    attention_loss: float = Field(default=0.0, ge=0.0)
    ranking_loss: float = Field(default=0.0, ge=0.0, description="CTR: weight of pairwise ranking distillation")
    group_field: str | None = Field(default=None, description="CTR: rank pairs within this categorical field's values")
    soft_loss: Literal["auto", "kl", "bce"] = "auto"
    freeze_embeddings: bool = Field(default=False, description="transformers: keep the word embeddings fixed")
    augment_mask: float = Field(default=0.0, ge=0.0, lt=1.0, description=(
        "text: each batch is also seen with this share of its tokens replaced by [MASK], with the "
        "teacher's soft targets computed on that copy (0: no augmentation)"))
    augment_crop: float = Field(default=0.0, ge=0.0, lt=1.0, description=(
        "images: each batch is also seen as random crops of at least this share of each side, "
        "resized and mirrored, with the teacher's soft targets on the same crops (0: none)"))
    augment_mixup: float = Field(default=0.0, ge=0.0, description=(
        "images: the crop copies are also blended with another photo of the batch, the weight drawn "
        "from Beta(augment_mixup, augment_mixup); needs augment_crop > 0 (0: no blending)"))
    seed: int = 0
    soup: int = Field(default=1, ge=1, le=8, description=(
        "train this many students (seeds seed, seed+1, ...) from the same start and serve the uniform "
        "average of their weights, BatchNorm statistics recomputed on the training split (a model "
        "soup: same size and speed, k times the training)"))

    @model_validator(mode="after")
    def _mixup_needs_crops(self):
        if self.augment_mixup > 0 and self.augment_crop == 0:
            raise ValueError("augment_mixup blends the crop copies, and augment_crop is 0: set augment_crop "
                             "(e.g. 0.6) or augment_mixup: 0")
        return self


def _mask(task, batch: Batch) -> Tensor | None:
    names = list(task.input_names)
    return batch.inputs[names.index("attention_mask")] if "attention_mask" in names else None


class SoftTargets(LossTerm):
    def __init__(self, cache: TeacherOutputs, temperature: float, kind: str, weight: float):
        self.cache, self.t, self.kind, self.weight, self.name = cache, temperature, kind, weight, "soft"

    def __call__(self, batch: Batch, model: nn.Module) -> Tensor:
        target = self.cache.logits[batch.index]
        fn = losses.soft_kl if self.kind == "kl" else losses.soft_bce
        return fn(batch.outputs, target, self.t)


class HiddenStates(LossTerm):
    """Mean over the layer pairs of the MSE between the student's (adapted) and the teacher's outputs."""

    def __init__(self, task, cache: TeacherOutputs, pairs: dict[str, str], adapters: nn.ModuleDict, weight: float):
        self.task, self.cache, self.pairs, self.adapters = task, cache, pairs, adapters
        self.weight, self.name = weight, "hidden"

    def __call__(self, batch: Batch, model: nn.Module) -> Tensor:
        total = 0.0
        for s, t in self.pairs.items():
            out = batch.hidden[s]
            key = adapter_key(s)
            if key in self.adapters:
                out = self.adapters[key](out)
            target = self.cache.hidden[t][batch.index]
            if target.dim() == 3:
                target = target[:, :out.shape[1]]
            total = total + losses.hidden_mse(out, target, _mask(self.task, batch) if out.dim() == 3 else None)
        return total / len(self.pairs)


class Relations(LossTerm):
    def __init__(self, task, cache: TeacherOutputs, student: str, teacher: str, heads: int, weight: float):
        self.task, self.cache, self.s, self.t, self.heads = task, cache, student, teacher, heads
        self.weight, self.name = weight, "attention"

    def __call__(self, batch: Batch, model: nn.Module) -> Tensor:
        q, k, v = (batch.hidden[f"{self.s}.{n}"] for n in ("query", "key", "value"))
        length = q.shape[1]
        tq, tk, tv = (self.cache.hidden[f"{self.t}.{n}"][batch.index][:, :length] for n in ("query", "key", "value"))
        mask = _mask(self.task, batch)
        return (losses.relation_kl((q, k), (tq, tk), self.heads, mask)
                + losses.relation_kl((v, v), (tv, tv), self.heads, mask))


class MaskedCopy(LossTerm):
    """Soft targets on a copy of the batch with a share of its tokens masked: more teacher signal
    per labelled row. The teacher runs on the copy at each step (no cache: the copy is new each time).
    It calls the student again, so it must be the last term (captured layers are overwritten)."""

    def __init__(self, teacher: nn.Module, share: float, mask_id: int, special: Tensor, temperature: float,
                 weight: float, seed: int):
        self.teacher, self.share, self.mask_id, self.special = teacher, share, mask_id, special
        self.t, self.weight, self.name = temperature, weight, "masked_copy"
        self.gen = torch.Generator().manual_seed(seed)

    def __call__(self, batch: Batch, model: nn.Module) -> Tensor:
        ids, mask = batch.inputs[0], batch.inputs[1]
        hit = (torch.rand(ids.shape, generator=self.gen) < self.share) & mask.bool() & ~torch.isin(ids, self.special)
        masked = ids.masked_fill(hit, self.mask_id)
        with torch.inference_mode():
            target = self.teacher(masked, mask).float()
        return losses.soft_kl(model(masked, mask), target.clone(), self.t)


class Ranking(LossTerm):
    def __init__(self, cache: TeacherOutputs, temperature: float, field_index: int | None, weight: float):
        self.cache, self.t, self.field, self.weight, self.name = cache, temperature, field_index, weight, "ranking"

    def __call__(self, batch: Batch, model: nn.Module) -> Tensor:
        groups = None if self.field is None else batch.inputs[0][:, self.field]
        return losses.pairwise_rank(batch.outputs, self.cache.logits[batch.index], groups, self.t)


def _adapters(student: nn.Module, teacher: nn.Module, pairs: dict[str, str], example) -> nn.ModuleDict:
    """A learned adapter for each pair whose widths differ: Linear on the last dim, 1x1 Conv on channels."""
    got: dict[str, Tensor] = {}

    def grab(model, names, prefix):
        mods = dict(model.named_modules())
        return [mods[n].register_forward_hook(lambda _m, _a, o, n=n: got.__setitem__(prefix + n, o if isinstance(o, Tensor) else o[0]))
                for n in names]

    hooks = grab(student, list(pairs), "s:") + grab(teacher, list(pairs.values()), "t:")
    with torch.no_grad():
        student.eval()(*example)
        teacher.eval()(*example)
    for h in hooks:
        h.remove()
    adapters = nn.ModuleDict()
    for s, t in pairs.items():
        a, b = got["s:" + s], got["t:" + t]
        if a.shape == b.shape:
            continue
        if a.dim() == 4 and a.shape[2:] == b.shape[2:]:
            adapters[adapter_key(s)] = nn.Conv2d(a.shape[1], b.shape[1], 1, bias=False)
        elif a.dim() in (2, 3) and a.shape[:-1] == b.shape[:-1]:
            adapters[adapter_key(s)] = nn.Linear(a.shape[-1], b.shape[-1], bias=False)
        else:
            raise ModelError(f"distill: the student's {s} gives {tuple(a.shape)} and the teacher's {t} gives "
                             f"{tuple(b.shape)}; no adapter maps one onto the other.",
                             "Set hidden_loss: 0, or a student whose layers keep the teacher's spatial size.")
    return adapters


def _shrink(built, scfg: StudentConfig, ctx: StageContext, report: StageReport) -> None:
    """Narrow the student before it trains, with the structured pruning of its family and no fine-tuning
    (distillation follows): transformers lose heads / FFN width (head_prune), pretrained image
    networks 1 - width of their channels (channel_prune)."""
    from ..prune.structured import ChannelPruneConfig, HeadPruneConfig, channel_prune, head_prune

    if scfg.heads_ratio or scfg.ffn_ratio:
        prune, pcfg = head_prune, HeadPruneConfig(heads_ratio=scfg.heads_ratio, ffn_ratio=scfg.ffn_ratio,
                                          importance=scfg.importance)
    else:
        prune, pcfg = channel_prune, ChannelPruneConfig(ratio=round(1 - scfg.width, 6), round_to=8,
                                                   importance=scfg.importance)
    sub = ModelState.from_module(built.module, built.spec)
    rep = prune(sub, pcfg, ctx)
    built.module, built.spec = sub.torch_model, sub.spec
    report.stats["student_narrowed"] = {k: rep.stats[k] for k in ("params_before", "params_after", "macs_before",
                                                                  "macs_after") if k in rep.stats}
    report.changed.update({k: f"student: {v}" for k, v in rep.changed.items()})


def _resolution_macs(teacher: nn.Module, student: nn.Module, task, report: StageReport, spec: dict) -> None:
    """MACs and parameters of teacher and student at one input (Torch-Pruning's counter, which sees
    the student's resize, stem stride and removed blocks), in the stats the channel-pruned student
    reports; ``spec`` is the student's, naming its resize and stem stride."""
    from ..prune.structured import count

    one = task.example_inputs(1, "val")
    (mb, pb), (ma, pa) = count(teacher, one), count(student, one)
    report.stats["student_narrowed"] = {"params_before": pb, "params_after": pa, "macs_before": mb, "macs_after": ma}
    size, stride = spec.get("input_resize"), spec.get("stem_stride")
    if size:
        report.changed["input"] = f"student: resized to {size[0]}x{size[1]} px inside the model"
    if stride:
        from ..models.stem_stride import stem

        report.changed[stem(student)[0]] = f"student: stride {stride} (the teacher's: {stem(teacher)[1].stride[0]})"


def _masked_copy(teacher: nn.Module, task, cfg: DistillConfig, kind: str) -> LossTerm:
    tok = getattr(task, "tokenizer", None)
    if "attention_mask" not in task.input_names or tok is None or tok.mask_token_id is None:
        raise UsageError("distill: augment_mask is for text tasks whose tokenizer has a [MASK] token.",
                         "Set augment_mask: 0.")
    if kind != "kl":
        raise UsageError("distill: augment_mask goes with multi-class soft targets.")
    special = torch.tensor(sorted(set(tok.all_special_ids)), dtype=torch.long)
    return MaskedCopy(teacher, cfg.augment_mask, int(tok.mask_token_id), special, cfg.temperature,
                      1.0 - cfg.alpha if cfg.alpha < 1 else 1.0, cfg.seed)


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@register("distill", DistillConfig, accepts=(TORCH,),
          summary="Knowledge distillation into a smaller student (layers, width, embedding dim)")
def distill(state: ModelState, cfg: DistillConfig, ctx: StageContext) -> StageReport:
    report = StageReport("distill", cfg.model_dump())
    if ctx.task is None:
        raise UsageError("distill needs a task: the student trains on its data.")
    runs: list[_Run] = []
    for i in range(cfg.soup):
        runs.append(_train_student(state, cfg.model_copy(update={"seed": cfg.seed + i}), ctx, report,
                                   runs[0].cache if runs else None, "distill" if i == 0 else f"distill-soup{i}"))
    run = runs[0]
    student, built, rec, task = run.student, run.built, run.rec, ctx.task
    if len(runs) > 1:
        from .soup import average_into

        report.stats["soup"] = average_into(student, [r.student for r in runs[1:]], task,
                                            [r.rec["val"] for r in runs])
        rec = {**rec, "val": report.stats["soup"]["val"]}
    teacher = state.torch_model
    before, after = _params(teacher), _params(student)
    report.changed["model"] = f"student: {before:,} -> {after:,} parameters"
    for line in built.copied:
        report.changed[line.split(" <- ")[0]] = f"initialised from the teacher's {line.split(' <- ')[-1]}"
    for n in run.frozen:
        report.skipped[n] = "kept fixed during distillation (freeze_embeddings)"
    report.stats.update(
        params_teacher=before, params_student=after, param_reduction=round(1 - after / before, 4),
        teacher_cache_s=round(run.cache.seconds, 1), soft_loss=run.kind,
        terms={t.name: t.weight for t in run.terms}, layer_pairs=run.pairs,
        train={k: rec[k] for k in ("steps", "epochs", "seconds", "final_loss", "terms", "resumed_from_step")},
        student_val=rec["val"])
    m = task.primary_metric
    report.notes.append(f"distilled into a student with {after / before:.1%} of the teacher's parameters; "
                        f"validation {m} {report.stats['teacher_val'][m]:.4f} (teacher) -> {rec['val'][m]:.4f}"
                        + (f" (the average of {len(runs)} students)" if len(runs) > 1 else ""))
    state.torch_model, state.spec = student, built.spec
    return report


@dataclass
class _Run:
    student: nn.Module
    built: object
    rec: dict
    cache: TeacherOutputs
    terms: list
    pairs: dict
    kind: str
    frozen: list


def _train_student(state: ModelState, cfg: DistillConfig, ctx: StageContext, report: StageReport,
                   cache: TeacherOutputs | None, name: str) -> _Run:
    """Build one student (seed ``cfg.seed``) and train it; ``cache``: the teacher's outputs of an
    earlier student of the same stage, reused."""
    task = ctx.task
    teacher = state.torch_model.eval()
    torch.manual_seed(cfg.seed)  # the student's fresh layers start the same whatever ran before
    built = make_student(teacher, state.spec, cfg.student)
    student = built.module
    if "then shortened" in built.copied:
        from .depth import shorten

        shorten(built, cfg.student.blocks, task, report)
        student = built.module
    if cfg.student.heads_ratio or cfg.student.ffn_ratio or "then channel-pruned" in built.copied:
        _shrink(built, cfg.student, ctx, report)
        student = built.module
    example = task.example_inputs(4, "val")
    if cfg.student.resolution or cfg.student.blocks or cfg.student.stem_stride:  # against the teacher
        _resolution_macs(teacher, student, task, report, built.spec)
    with torch.no_grad():
        t_out, s_out = teacher(*example), student.eval()(*example)
    if t_out.shape != s_out.shape:
        raise ModelError(f"distill: the teacher predicts {tuple(t_out.shape[1:])} outputs per row and the "
                         f"student {tuple(s_out.shape[1:])}; they must predict the same classes.")
    kind = cfg.soft_loss if cfg.soft_loss != "auto" else ("bce" if t_out.dim() == 1 or t_out.shape[-1] == 1 else "kl")
    field_index = None
    if cfg.group_field is not None:
        fields = list(task.info.get("categorical", []))
        if cfg.group_field not in fields:
            raise UsageError(f"distill: group_field {cfg.group_field!r} is not a categorical field of this task.",
                             f"Fields: {', '.join(fields) or 'none'}.")
        field_index = fields.index(cfg.group_field)
    if (cfg.ranking_loss > 0 or cfg.group_field) and kind != "bce":
        raise UsageError("distill: ranking_loss and group_field are for one-logit (CTR) models.")

    names, capture, pairs = [], [], {}
    if cfg.hidden_loss > 0:
        if not built.layer_pairs:
            raise UsageError("distill: hidden_loss needs layer pairs, which this student family has none of.",
                             "Set hidden_loss: 0.")
        pairs = built.layer_pairs
        names += list(pairs.values())
        capture += list(pairs)
    if cfg.attention_loss > 0:
        if not built.attention:
            raise UsageError("distill: attention_loss is for transformer students.", "Set attention_loss: 0.")
        (s_attn, t_attn), = built.attention.items()
        qkv = ("query", "key", "value")
        mods = dict(student.named_modules())
        if not all(f"{s_attn}.{n}" in mods for n in qkv):
            raise UsageError(f"distill: attention_loss needs the query/key/value layers of {s_attn}, "
                             "which this model does not have (DistilBERT names them differently).",
                             "Set attention_loss: 0.")
        names += [f"{t_attn}.{n}" for n in qkv]
        capture += [f"{s_attn}.{n}" for n in qkv]
        tmods = dict(teacher.named_modules())
        widths = [getattr(m.get(f"{a}.query"), "out_features", 0) for m, a in ((mods, s_attn), (tmods, t_attn))]
        # MiniLM-v2 relation heads: the teacher's head count, or fewer where a narrowed student's width
        # (e.g. 4 heads of 32) is not a multiple of it
        rel_heads = losses.relation_heads(built.heads[1], *widths)
        report.stats["relation_heads"] = rel_heads
    if cache is None:
        cache = teacher_outputs(teacher, task, names)

    terms: list[LossTerm] = []
    if cfg.alpha > 0:
        terms.append(TaskLoss(task, weight=cfg.alpha))
    if cfg.alpha < 1:
        terms.append(SoftTargets(cache, cfg.temperature, kind, 1.0 - cfg.alpha))
    adapters = _adapters(student, teacher, pairs, example) if pairs else nn.ModuleDict()
    if pairs:
        terms.append(HiddenStates(task, cache, pairs, adapters, cfg.hidden_loss))
    if cfg.attention_loss > 0:
        terms.append(Relations(task, cache, s_attn, t_attn, rel_heads, cfg.attention_loss))
    if cfg.ranking_loss > 0:
        terms.append(Ranking(cache, cfg.temperature, field_index, cfg.ranking_loss))
    if cfg.augment_mask > 0:
        terms.append(_masked_copy(teacher, task, cfg, kind))
    if cfg.augment_crop > 0:
        if example[0].dim() != 4 or len(example) != 1 or kind != "kl":
            raise UsageError("distill: augment_crop is for image classifiers (one input of shape "
                             "batch x channels x height x width).", "Set augment_crop: 0.")
        from .image_augment import CropFlipCopy

        terms.append(CropFlipCopy(teacher, cfg.augment_crop, cfg.temperature,
                                  1.0 - cfg.alpha if cfg.alpha < 1 else 1.0, cfg.seed, cfg.augment_mixup,
                                  pairs, adapters, cfg.hidden_loss))
    if not terms:
        raise UsageError("distill: every loss weight is 0.", "Give alpha < 1 or a positive hidden_loss.")

    frozen = []
    if cfg.freeze_embeddings:
        for n, p in student.named_parameters():
            if "word_embeddings" in n:
                p.requires_grad_(False)
                frozen.append(n)
        if not frozen:
            raise UsageError("distill: freeze_embeddings is for models with word embeddings; this one has none.")
    if "teacher_val" not in report.stats:  # once for a soup's students
        report.stats["teacher_val"] = task.evaluate(teacher, "val")
        report.stats["student_val_before"] = task.evaluate(student, "val")
    base = task.train_config("full")
    update = {"epochs": cfg.epochs, "seed": cfg.seed}
    if cfg.lr is not None:
        update["lr"] = cfg.lr
    if cfg.batch_size is not None:
        update["batch_size"] = cfg.batch_size
    train_cfg = base.model_copy(update=update)
    # the task's own regularisers (e.g. ctr's frequency-aware row L2) train the student too
    terms += [t for t in task.default_terms(student, train_cfg) if not isinstance(t, TaskLoss)]
    student.distill_adapters = adapters  # trained with the student, removed before it is saved
    try:
        rec = task.train_model(student, train_cfg, terms=terms, capture=capture,
                               progress=ctx.progress, desc=name, **ctx.train_checkpoint(name))
    finally:
        del student.distill_adapters
        for p in student.parameters():
            p.requires_grad_(True)
    return _Run(student.eval(), built, rec, cache, terms, pairs, kind, frozen)
