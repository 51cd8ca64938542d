"""DeepFM for click / conversion prediction: one embedding table per categorical field,
a factorization-machine term, and an MLP over the embeddings and dense features."""
from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from .registry import register_model


class DeepFMConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    vocab_sizes: list[int]
    num_dense: int = 0
    embed_dim: int = 16
    hidden: list[int] = Field(default_factory=lambda: [256, 128])
    dropout: float = 0.0


class DeepFM(nn.Module):
    def __init__(self, cfg: DeepFMConfig):
        super().__init__()
        f, d = len(cfg.vocab_sizes), cfg.embed_dim
        self.embeddings = nn.ModuleList(nn.Embedding(v, d) for v in cfg.vocab_sizes)
        self.linear_embeddings = nn.ModuleList(nn.Embedding(v, 1) for v in cfg.vocab_sizes)
        for e in self.embeddings:
            nn.init.normal_(e.weight, std=0.01)
        for e in self.linear_embeddings:
            nn.init.zeros_(e.weight)
        self.num_dense = cfg.num_dense
        self.dense_linear = nn.Linear(cfg.num_dense, 1) if cfg.num_dense else None
        layers, cin = [], f * d + cfg.num_dense
        for h in cfg.hidden:
            layers += [nn.Linear(cin, h), nn.ReLU()]
            if cfg.dropout:
                layers.append(nn.Dropout(cfg.dropout))
            cin = h
        layers.append(nn.Linear(cin, 1))
        self.mlp = nn.Sequential(*layers)
        self.bias = nn.Parameter(torch.zeros(1))

    def forward(self, sparse: torch.Tensor, dense: torch.Tensor | None = None) -> torch.Tensor:
        emb = torch.stack([e(sparse[:, i]) for i, e in enumerate(self.embeddings)], dim=1)
        first = torch.cat([e(sparse[:, i]) for i, e in enumerate(self.linear_embeddings)], 1).sum(1)
        return deepfm_head(self, emb, first, dense)


def deepfm_head(m: nn.Module, emb: torch.Tensor, first: torch.Tensor, dense: torch.Tensor | None) -> torch.Tensor:
    """The FM term, the dense features and the MLP over the looked-up rows: ``emb`` [B, F, D],
    ``first`` [B] (the sum of the first-order rows); ``m`` has ``dense_linear``, ``mlp``, ``bias``."""
    fm = 0.5 * (emb.sum(1).pow(2) - emb.pow(2).sum(1)).sum(1)
    deep_in = emb.flatten(1)
    if m.dense_linear is not None and dense is not None:
        first = first + m.dense_linear(dense).squeeze(1)
        deep_in = torch.cat([deep_in, dense], dim=1)
    return m.bias + first + fm + m.mlp(deep_in).squeeze(1)


@register_model("deepfm", DeepFMConfig)
def build_deepfm(cfg: DeepFMConfig) -> nn.Module:
    return DeepFM(cfg)
