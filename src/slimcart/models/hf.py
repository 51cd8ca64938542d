"""Hugging Face sequence classifiers (BERT, MiniLM, DistilBERT, RoBERTa) from a local folder.

The folder is what ``save_pretrained(..., safe_serialization=True)`` writes: ``config.json``,
``model.safetensors`` and the tokenizer files. The spec keeps the HF config as a dict::

    {"arch": "hf_sequence_classification",
     "config": {"model_type": "bert", "hf_config": {"hidden_size": 384, "id2label": {...}, ...}}}

The module is ``HFSequenceClassifier``: ``forward(input_ids, attention_mask)`` returns the logits
tensor; the transformers model sits at ``.model``, so BERT/RoBERTa layers keep the names that
``head_prune`` reads (``model.bert.encoder.layer.0.attention.self.query``...). DistilBERT's
attention (``q_lin``, ``n_heads``) is not the BERT layout: head_prune does not apply to it.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from ..errors import ModelError
from .registry import load_strict, register_model, spec
from .zoo import read_safetensors

ARCH = "hf_sequence_classification"
FAMILIES = ("bert", "distilbert", "roberta")  # MiniLM checkpoints are model_type "bert"
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "tokenizer_config.json")
_DROP = ("transformers_version", "architectures", "model_type", "dtype", "torch_dtype")  # dtype: built in float32


class HFConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model_type: str
    hf_config: dict[str, Any]


class HFSequenceClassifier(nn.Module):
    def __init__(self, cfg: HFConfig):
        super().__init__()
        from transformers import AutoConfig, AutoModelForSequenceClassification

        if cfg.model_type not in FAMILIES:
            raise ModelError(f"Hugging Face model_type {cfg.model_type!r} is not supported.",
                             f"Supported families: {', '.join(FAMILIES)} (MiniLM is 'bert').")
        self.model = AutoModelForSequenceClassification.from_config(
            AutoConfig.for_model(cfg.model_type, **cfg.hf_config))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


@register_model(ARCH, HFConfig)
def build_hf(cfg: HFConfig) -> nn.Module:
    return HFSequenceClassifier(cfg)


def is_hf_folder(path: str | Path) -> bool:
    return Path(path).is_dir() and (Path(path) / "config.json").is_file()


def load_hf_folder(path: str | Path) -> tuple[nn.Module, dict[str, Any], dict[str, Any]]:
    """(module with the folder's weights, its spec, info: tokenizer folder, labels, lengths)."""
    folder = Path(path)
    if not is_hf_folder(folder):
        raise ModelError(f"{folder} is not a Hugging Face model folder: config.json is missing.")
    try:
        hf = json.loads((folder / "config.json").read_text())
    except json.JSONDecodeError as exc:
        raise ModelError(f"{folder / 'config.json'} is not valid JSON: {exc}") from None
    weights = folder / "model.safetensors"
    if not weights.is_file():
        pickled = [p.name for p in folder.glob("pytorch_model*.bin")]
        hint = ("Convert it to safetensors (loading .bin needs pickle): in Python, "
                "AutoModelForSequenceClassification.from_pretrained(folder).save_pretrained(folder, "
                "safe_serialization=True)." if pickled else "Save the model with save_pretrained().")
        sharded = (folder / "model.safetensors.index.json").is_file()
        raise ModelError(f"{folder} has no model.safetensors" + (" (sharded checkpoints are not supported)"
                                                                  if sharded else "")
                         + (f"; it has {', '.join(pickled)}." if pickled else "."), hint)
    model_type = hf.get("model_type", "")
    cfg = HFConfig(model_type=model_type, hf_config={k: v for k, v in hf.items()
                                                     if k not in _DROP and not k.startswith("_")})
    model = HFSequenceClassifier(cfg)
    state = {k.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias"): v
             for k, v in read_safetensors(weights).items() if not k.endswith(("position_ids", "token_type_ids"))}
    if not any(k.startswith(model.model.base_model_prefix + ".") for k in state):
        state = {f"{model.model.base_model_prefix}.{k}": v for k, v in state.items()}  # a bare encoder
    load_strict(model, {f"model.{k}": v for k, v in state.items()}, str(weights))
    conf = model.model.config
    positions = conf.max_position_embeddings
    offset = (conf.pad_token_id or 0) + 1 if model_type == "roberta" else 0  # RoBERTa positions start after pad
    info = {"tokenizer": str(folder) if any((folder / f).is_file() for f in TOKENIZER_FILES) else None,
            "model_type": model_type, "num_labels": conf.num_labels,
            "id2label": [conf.id2label[i] for i in range(conf.num_labels)],
            "max_position_embeddings": positions, "max_length": positions - offset}
    return model.eval(), spec(ARCH, cfg), info
