"""Vocabulary pruning: keep only the word-embedding rows of the tokens the task's data uses.

The text model's ``...embeddings.word_embeddings`` table (BERT, RoBERTa, DistilBERT layout)
becomes a ``CompactEmbedding`` (models/compact_embedding.py): the kept tokens' rows, unchanged,
plus one fallback row that every other token id reads, through an int32 id map. The tokenizer
is not touched, so a saved bundle tokenizes as before. A token is kept when it occurs at least
``min_count`` times at the non-padding positions (attention mask) of the ``splits`` counted;
with ``keep_special`` the tokenizer's special ids ([PAD], [UNK], [CLS], [SEP], [MASK]) are kept
too. The fallback row is the [UNK] row (``fallback: unk``) or the plain mean of the dropped rows
(``mean``); with ``fallback: nearest`` each dropped token reads instead the kept row closest to its
own (cosine similarity of the embedding rows), so an unseen word keeps a vector near its meaning
for the cost of the id map alone. Inputs whose tokens are all kept give exactly the logits they gave
before.
"""
from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from pydantic import Field, field_validator
from torch import nn

from ..errors import UsageError
from ..models.compact_embedding import CompactEmbedding, compact_table
from ..registry import TORCH, TechniqueConfig, register
from ..stage import ModelState, StageContext, StageReport

SPLITS = ("train", "val", "test")
_SPECIAL_KEYS = ("pad_token_id", "unk_token_id", "cls_token_id", "sep_token_id", "mask_token_id",
                 "bos_token_id", "eos_token_id")


class VocabPruneConfig(TechniqueConfig):
    min_count: int = Field(default=1, ge=1)
    splits: list[str] = ["train"]
    keep_special: bool = True
    fallback: Literal["unk", "mean", "nearest"] = "unk"

    @field_validator("splits")
    @classmethod
    def _known_splits(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("give at least one split to count tokens on, e.g. [train]")
        bad = [s for s in value if s not in SPLITS]
        if bad:
            raise ValueError(f"unknown split(s) {bad}; choose from {list(SPLITS)}")
        if len(set(value)) != len(value):
            raise ValueError("each split may be named once")
        return value


def word_embeddings(model: nn.Module) -> tuple[str, nn.Module]:
    """(name, module) of the model's word-embedding table; a UsageError if it has none."""
    found = [(n, m) for n, m in model.named_modules()
             if n == "embeddings.word_embeddings" or n.endswith(".embeddings.word_embeddings")]
    if len(found) != 1 or not isinstance(found[0][1], (nn.Embedding, CompactEmbedding)):
        what = ", ".join(f"{n} ({type(m).__name__})" for n, m in found) or "none"
        raise UsageError(f"vocab_prune: {type(model).__name__} has no word-embedding table (one "
                         "nn.Embedding named ...embeddings.word_embeddings, as in BERT, RoBERTa and "
                         f"DistilBERT); found: {what}.",
                         "vocab_prune applies to text models, before embedding_quant.")
    return found[0]


def _hf_config(model: nn.Module):
    """The Hugging Face config of the model's encoder (the first with a vocab_size), or None."""
    configs = (getattr(m, "config", None) for m in model.modules())
    return next((c for c in configs if isinstance(getattr(c, "vocab_size", None), int)), None)


def special_ids(ctx: StageContext, model: nn.Module) -> list[int]:
    """The tokenizer's special ids, else the special ids the model config names."""
    tok = getattr(ctx.task, "tokenizer", None)
    ids = getattr(tok, "all_special_ids", None)
    if ids is None:
        conf = _hf_config(model)
        ids = [getattr(conf, k, None) for k in _SPECIAL_KEYS]
    return sorted({int(i) for i in ids if isinstance(i, int) and i >= 0})


def unk_id(ctx: StageContext, model: nn.Module, num_ids: int) -> int:
    for source in (getattr(ctx.task, "tokenizer", None), _hf_config(model)):
        if isinstance(i := getattr(source, "unk_token_id", None), int) and 0 <= i < num_ids:
            return i
    raise UsageError("vocab_prune: fallback 'unk' needs the [UNK] token id, and neither the task's "
                     "tokenizer nor the model config gives one.", "Use fallback: mean.")


def token_counts(ctx: StageContext, splits: list[str], num_ids: int) -> tuple[np.ndarray, int]:
    """How often each token id occurs at the non-padding positions of ``splits``; positions."""
    task = ctx.task
    names = list(getattr(task, "input_names", ()))
    counts, positions = np.zeros(num_ids, dtype=np.int64), 0
    for name in splits:
        split = getattr(task, "splits", {}).get(name)
        if split is None:
            raise UsageError(f"vocab_prune.splits: the task has no {name!r} split "
                             f"(it has: {', '.join(getattr(task, 'splits', {})) or 'none'}).")
        inputs = split.inputs
        ids = inputs[names.index("input_ids")] if "input_ids" in names else inputs[0]
        if not (isinstance(ids, torch.Tensor) and ids.dim() == 2 and not ids.is_floating_point()):
            raise UsageError(f"vocab_prune needs a text task whose inputs are token ids "
                             f"(input_ids, attention_mask); {getattr(task, 'name', task)!r} has none.")
        mask = inputs[names.index("attention_mask")] if "attention_mask" in names else None
        seen = ids[mask.bool()] if mask is not None else ids.reshape(-1)
        if seen.numel() and (int(seen.min()) < 0 or int(seen.max()) >= num_ids):
            raise UsageError(f"vocab_prune: token ids of the {name!r} split fall outside [0, "
                             f"{num_ids}); the model's vocabulary does not match the task's tokenizer.")
        counts += np.bincount(seen.numpy(), minlength=num_ids)
        positions += int(seen.numel())
    return counts, positions


def nearest_rows(table: CompactEmbedding, weight: torch.Tensor, keep: np.ndarray, chunk: int = 4096) -> None:
    """Point every dropped id of ``table``'s id map at the kept row most similar (cosine) to its own
    row of ``weight``, the table before pruning."""
    kept_ids, dropped = np.flatnonzero(keep), np.flatnonzero(~keep)
    if not dropped.size or not kept_ids.size:
        return
    unit = torch.nn.functional.normalize(weight.float(), dim=1)
    kept_unit = unit[torch.from_numpy(kept_ids)]
    rows = table.id_map[torch.from_numpy(kept_ids)]  # the compact row of each kept id
    with torch.no_grad():
        for start in range(0, dropped.size, chunk):
            ids = torch.from_numpy(dropped[start:start + chunk])
            best = (unit[ids] @ kept_unit.T).argmax(1)
            table.id_map[ids] = rows[best]


def _tied(model: nn.Module, name: str, weight: torch.Tensor) -> list[str]:
    return [n for n, p in model.named_parameters(remove_duplicate=False)
            if p is weight and n != f"{name}.weight"]


@register("vocab_prune", VocabPruneConfig, accepts=(TORCH,),
          summary="keep only the word-embedding rows of the task's tokens; the others share a fallback row")
def vocab_prune(state: ModelState, cfg: VocabPruneConfig, ctx: StageContext) -> StageReport:
    report = StageReport("vocab_prune", cfg.model_dump())
    model = state.torch_model
    name, emb = word_embeddings(model)
    if isinstance(emb, CompactEmbedding):
        report.skipped[name] = "already vocabulary-pruned"
        return report
    if tied := _tied(model, name, emb.weight):
        raise UsageError(f"vocab_prune: {name} shares its weight with {', '.join(tied)}; a tied "
                         "output layer needs every row.")
    num_ids, dim = emb.weight.shape
    counts, positions = token_counts(ctx, cfg.splits, num_ids)
    keep = counts >= cfg.min_count
    specials = [i for i in special_ids(ctx, model) if i < num_ids] if cfg.keep_special else []
    keep[np.asarray(specials, dtype=np.int64)] = True
    kept = int(keep.sum())
    size = emb.weight.element_size()
    before, after = num_ids * dim * size, (kept + 1) * dim * size + 4 * num_ids
    if kept == num_ids:
        report.skipped[name] = f"nothing to drop: all {num_ids} tokens occur in {', '.join(cfg.splits)}"
        return report
    if after >= before:
        report.skipped[name] = (f"would not shrink: keeping {kept} of {num_ids} rows takes {after} "
                                f"bytes with the id map vs {before} now")
        return report
    fallback = emb.weight[unk_id(ctx, model, num_ids)] if cfg.fallback == "unk" else None
    new = compact_table(emb, np.flatnonzero(keep), fallback=fallback)
    if cfg.fallback == "nearest":
        nearest_rows(new, emb.weight.detach(), keep)
    parent, _, child = name.rpartition(".")
    model.get_submodule(parent)._modules[child] = new
    state.spec = {**state.spec, "vocab_pruning": {"module": name, "num_ids": num_ids, "kept_rows": kept}}
    remapped = int(counts[~keep].sum())
    report.changed[name] = f"word embeddings {num_ids} -> {kept} rows (+1 fallback)"
    report.stats = {"rows_before": num_ids, "rows_after": kept + 1, "tokens_kept": kept,
                    "special_ids_kept": len(specials), "bytes_before": before, "bytes_after": after,
                    "positions_counted": positions,
                    "positions_remapped_share": remapped / positions if positions else 0.0}
    source = {"unk": "one fallback row (the [UNK] token's vector)",
              "mean": "one fallback row (the mean of the dropped rows)",
              "nearest": "the kept row closest to its own (cosine)"}[cfg.fallback]
    report.notes.append(f"kept {kept} of {num_ids} word embeddings (tokens seen at least "
                        f"{cfg.min_count}x in {', '.join(cfg.splits)}); every other token now reads "
                        f"{source}. The tokenizer is unchanged.")
    if "test" in cfg.splits:
        report.notes.append("the test split's tokens were counted, so test metrics do not show "
                            "how the model handles unseen words.")
    return report
