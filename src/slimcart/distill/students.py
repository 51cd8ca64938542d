"""Student builders: from the teacher's architecture spec, the spec and module of a smaller model.

- Transformers (``text_classifier``, a Hugging Face BERT / RoBERTa / DistilBERT classifier): k of
  the teacher's n layers, initialised from the teacher layers named by ``layer_map`` (0-based;
  default: evenly spaced, ending with the last), with the embeddings and the head copied;
  ``heads_ratio`` / ``ffn_ratio`` then remove that share of each layer's heads / FFN neurons
  (``head_prune``'s ranking, by weight magnitude or, with ``importance: taylor``, by the student's
  task-loss gradients) before the student trains, so the narrow student learns
  from the teacher directly.
- ``resnet_small``: the widths times ``width`` (and ``blocks`` per stage), trained from scratch.
- Pretrained image networks (``efficientnet_lite0``, ``torchvision`` / ``timm`` architectures): a
  copy of the teacher that sees its input at ``resolution`` pixels (resized inside the model, so it
  is served with the teacher's preprocessing; MACs fall with the pixel count) or whose first
  convolution moves in longer steps (``stem_stride``: smaller feature maps, no resize), that keeps ``blocks``
  of each stage's blocks (``depth.py``: the residual blocks whose removal matters least go), and/or has ``1 - width``
  of its prunable channels removed (``channel_prune``, magnitude ranking, widths rounded to
  multiples of 8), so the student starts from the teacher's fine-tuned features. Its layer pair is
  the global pooling (``global_pool`` / ``avgpool``): hidden_loss matches the pooled features.
- ``deepfm``: a smaller ``embed_dim`` and ``hidden`` MLP, trained from scratch.
- ``mlp``: other ``hidden`` sizes, trained from scratch.

Each builder returns ``Student(module, spec, layer_pairs, copied)``: ``layer_pairs`` maps a student
module name to the teacher module whose output it is matched with by the hidden-state loss.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from ..errors import UsageError
from ..models import build

TRANSFORMS = ("kept_blocks", "reshape", "row_pruning", "bn_folded", "embedding_quant", "weight_only", "half",
              "vocab_pruning", "input_resize", "stem_stride")


class StudentConfig(BaseModel):
    """What the student keeps or changes; only the keys of the teacher's family apply."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    layers: int | None = Field(default=None, ge=1, description="transformers: encoder layers kept")
    layer_map: list[int] | None = Field(default=None, description=(
        "transformers: the teacher layer (0-based) each student layer starts from"))
    init: Literal["teacher", "random"] = Field(default="teacher", description=(
        "transformers: copy the mapped teacher layers, or train the student from scratch"))
    heads_ratio: float = Field(default=0.0, ge=0.0, lt=1.0, description=(
        "transformers: fraction of each student layer's attention heads removed before training"))
    ffn_ratio: float = Field(default=0.0, ge=0.0, lt=1.0, description=(
        "transformers: fraction of each student layer's FFN width removed before training"))
    importance: Literal["magnitude", "taylor"] = Field(default="magnitude", description=(
        "transformers and pretrained image networks: how the heads / neurons / channels removed before "
        "training are ranked (taylor: task-loss gradients of the student on training batches)"))
    width: float | None = Field(default=None, gt=0, le=4, description="CNN: width multiplier")
    resolution: int | None = Field(default=None, ge=16, description=(
        "pretrained image networks: the side in pixels the student resizes its input to"))
    stem_stride: int | None = Field(default=None, ge=2, le=8, description=(
        "pretrained image networks: the stride of the first convolution (the teacher's is 2): every "
        "feature map shrinks as at a lower resolution, without a resize in the model"))
    blocks: list[int] | None = Field(default=None, description=(
        "CNN: residual blocks per stage; pretrained image networks: blocks kept per stage (the first, "
        "then those whose removal moves the predictions most)"))
    embed_dim: int | None = Field(default=None, ge=1, description="DeepFM: embedding dimension")
    hidden: list[int] | None = Field(default=None, description="DeepFM / MLP: hidden layer widths")


@dataclass
class Student:
    module: nn.Module
    spec: dict[str, Any]
    layer_pairs: dict[str, str] = field(default_factory=dict)   # student module -> teacher module
    copied: list[str] = field(default_factory=list)             # what was initialised from the teacher
    attention: dict[str, str] = field(default_factory=dict)     # student attention prefix -> teacher's
    heads: tuple[int, int] = (0, 0)                             # (student, teacher) attention heads


def _keys_for(family: str, cfg: StudentConfig) -> set[str]:
    keys = {"transformer": {"layers", "layer_map", "init", "heads_ratio", "ffn_ratio", "importance"}, "cnn": {"width", "blocks"},
            "deepfm": {"embed_dim", "hidden"}, "mlp": {"hidden"}, "pruned": {"width", "resolution", "stem_stride", "blocks", "importance"}}[family]
    given = {k for k in cfg.model_fields_set}
    wrong = sorted(given - keys)
    if wrong:
        raise UsageError(f"distill: student.{wrong[0]} does not apply to a {family} teacher.",
                         f"A {family} student takes: {', '.join(sorted(keys))}.")
    return given


def make_student(teacher: nn.Module, spec: dict[str, Any], cfg: StudentConfig) -> Student:
    arch = spec.get("arch")
    done = [k for k in TRANSFORMS if spec.get(k)]
    if done:
        raise UsageError(f"distill: the teacher is already transformed ({', '.join(done)}); a student is "
                         "built from a plain architecture.",
                         "Put the distill stage first in the recipe; compress the student afterwards.")
    if arch == "text_classifier":
        return _transformer(teacher, spec, cfg, ("config", "encoder"), "num_hidden_layers",
                            "encoder.encoder.layer", "encoder.encoder.layer.{i}.attention.self")
    if arch == "hf_sequence_classification":
        if spec["config"]["model_type"] == "distilbert":
            return _transformer(teacher, spec, cfg, ("config", "hf_config"), "n_layers",
                                "model.distilbert.transformer.layer", "model.distilbert.transformer.layer.{i}.attention")
        base = teacher.model.base_model_prefix
        return _transformer(teacher, spec, cfg, ("config", "hf_config"), "num_hidden_layers",
                            f"model.{base}.encoder.layer", f"model.{base}.encoder.layer.{{i}}.attention.self")
    if arch == "resnet_small":
        return _cnn(spec, cfg)
    if arch in ("efficientnet_lite0", "torchvision", "timm"):
        return _pretrained_image(teacher, spec, cfg)
    if arch == "deepfm":
        return _config_student(spec, cfg, "deepfm")
    if arch == "mlp":
        return _config_student(spec, cfg, "mlp")
    raise UsageError(f"distill: no student builder for the architecture {arch!r}.",
                     "Students are built for text_classifier, Hugging Face BERT/RoBERTa/DistilBERT, "
                     "resnet_small, deepfm and mlp teachers.")


def _pretrained_image(teacher, spec, cfg) -> Student:
    _keys_for("pruned", cfg)
    if cfg.width is not None and cfg.width >= 1:
        raise UsageError(f"distill: student.width is {cfg.width}; a pruned image student keeps a share of "
                         "the teacher's channels below 1, e.g. student: {width: 0.5}.")
    if cfg.width is None and cfg.resolution is None and cfg.blocks is None and cfg.stem_stride is None:
        raise UsageError("distill: a pretrained image student needs student.resolution (pixels, e.g. 112), "
                         "student.stem_stride (the first convolution's stride, e.g. 3), "
                         "student.blocks (blocks kept per stage) and/or student.width below 1 (the share of "
                         "channels kept), e.g. student: {width: 0.5}.")
    new, copied = copy.deepcopy(spec), ["all layers"]
    if cfg.resolution is not None:
        new["input_resize"] = [cfg.resolution, cfg.resolution]
        copied.append(f"input resized to {cfg.resolution} px")
    if cfg.stem_stride is not None:
        new["stem_stride"] = cfg.stem_stride
        copied.append(f"first convolution at stride {cfg.stem_stride}")
    module = build(new)
    module.load_state_dict(teacher.state_dict())
    if cfg.blocks is not None:
        copied.append("then shortened")
    if cfg.width is not None:
        copied.append("then channel-pruned")
    return Student(module, new, _pooled_pair(module), copied)


POOLS = ("global_pool", "avgpool")  # timm's and torchvision's global pooling before the classifier


def _pooled_pair(module: nn.Module) -> dict[str, str]:
    """hidden_loss of an image student: its pooled features (the classifier's input) against the
    teacher's; the same module in both, as the student is a copy of the teacher."""
    names = dict(module.named_modules())
    return {n: n for n in POOLS if n in names}


def default_map(n: int, k: int) -> list[int]:
    return [round((i + 1) * n / k) - 1 for i in range(k)]


def _transformer(teacher, spec, cfg, path, layers_key, layer_prefix, attn) -> Student:
    _keys_for("transformer", cfg)
    conf = spec
    for p in path:
        conf = conf[p]
    n = int(conf[layers_key])
    k = cfg.layers or (len(cfg.layer_map) if cfg.layer_map else None)
    if k is None:
        raise UsageError("distill: a transformer student needs student.layers (or student.layer_map).",
                         f"The teacher has {n} layers; e.g. student: {{layers: 2}}.")
    if k > n:
        raise UsageError(f"distill: student.layers is {k} but the teacher has only {n} layers.")
    layer_map = list(cfg.layer_map) if cfg.layer_map is not None else default_map(n, k)
    if len(layer_map) != k:
        raise UsageError(f"distill: student.layer_map has {len(layer_map)} entries for {k} layers.",
                         "Give one teacher layer per student layer.")
    bad = [i for i in layer_map if not 0 <= i < n]
    if bad:
        raise UsageError(f"distill: student.layer_map names layer {bad[0]}, but the teacher's layers are "
                         f"0..{n - 1}.", f"e.g. layer_map: {default_map(n, k)}")
    new = copy.deepcopy(spec)
    target = new
    for p in path:
        target = target[p]
    target[layers_key] = k
    student = build(new)
    copied = []
    if cfg.init == "teacher":
        own, src = student.state_dict(), teacher.state_dict()
        state = {}
        for key in own:
            tkey = key
            if key.startswith(layer_prefix + "."):
                i, rest = key[len(layer_prefix) + 1:].split(".", 1)
                tkey = f"{layer_prefix}.{layer_map[int(i)]}.{rest}"
            state[key] = src[tkey].detach().clone()
        student.load_state_dict(state, strict=True)
        copied = [f"{layer_prefix}.{i} <- {layer_prefix}.{j}" for i, j in enumerate(layer_map)]
        copied.append("embeddings and head")
    pairs = {f"{layer_prefix}.{i}": f"{layer_prefix}.{j}" for i, j in enumerate(layer_map)}
    heads = int(conf.get("num_attention_heads", conf.get("n_heads", 1)))
    last = k - 1
    attention = {attn.format(i=last): attn.format(i=layer_map[last])}
    student.slimcart_spec = new
    return Student(student, new, pairs, copied, attention, (heads, heads))


def _cnn(spec, cfg) -> Student:
    _keys_for("cnn", cfg)
    new = copy.deepcopy(spec)
    c = new["config"]
    widths = [int(w) for w in c.get("widths", [32, 64, 128])]
    if cfg.width is not None:
        c["widths"] = [max(1, round(w * cfg.width)) for w in widths]
    if cfg.blocks is not None:
        if len(cfg.blocks) != len(widths) or min(cfg.blocks) < 1:
            raise UsageError(f"distill: student.blocks needs {len(widths)} positive counts (one per stage), "
                             f"got {cfg.blocks}.")
        c["blocks"] = list(cfg.blocks)
    student = build(new)
    t_blocks = spec["config"].get("blocks", [1] * len(widths))
    s_blocks = c.get("blocks", t_blocks)
    # the last block of each stage, in both: the outputs compared by the feature-map loss
    t_last = [sum(t_blocks[:i + 1]) - 1 for i in range(len(widths))]
    s_last = [sum(s_blocks[:i + 1]) - 1 for i in range(len(widths))]
    pairs = {f"layers.{s}": f"layers.{t}" for s, t in zip(s_last, t_last)}
    return Student(student, new, pairs, [])


def _config_student(spec, cfg, family) -> Student:
    given = _keys_for(family, cfg)
    new = copy.deepcopy(spec)
    for key in given:
        value = getattr(cfg, key)
        if key == "hidden" and (not value or min(value) < 1):
            raise UsageError(f"distill: student.hidden must be a list of positive widths, got {value}.")
        new["config"][key] = list(value) if isinstance(value, list) else value
    return Student(build(new), new, {}, [])
