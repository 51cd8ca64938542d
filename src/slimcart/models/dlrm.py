"""DLRM (Naumov et al., 2019) for click / conversion prediction: a bottom MLP over the dense
features, one embedding table per categorical field, the dot products of every pair of those
vectors, and a top MLP over the pairs and the bottom MLP's output.

The tables are ``embeddings`` (a ModuleList, one per field, as in DeepFM), so row pruning,
row-wise quantization and the frequency-aware row L2 work on them unchanged."""
from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from .registry import register_model


class DLRMConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    vocab_sizes: list[int]
    num_dense: int = 0
    embed_dim: int = 16
    bottom: list[int] = Field(default_factory=lambda: [64])     # dense features -> ... -> embed_dim
    top: list[int] = Field(default_factory=lambda: [256, 128])  # interactions -> ... -> 1 logit
    dropout: float = 0.0

    @model_validator(mode="after")
    def _check(self) -> "DLRMConfig":
        if not self.vocab_sizes or min(self.vocab_sizes) < 1:
            raise ValueError("vocab_sizes needs one size >= 1 per categorical field")
        if self.embed_dim < 1 or min([*self.bottom, *self.top], default=1) < 1:
            raise ValueError("embed_dim and the MLP widths must be >= 1")
        return self


def _mlp(sizes: list[int], dropout: float, last_relu: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes, sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2 or last_relu:
            layers.append(nn.ReLU())
            if dropout:
                layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


class DLRM(nn.Module):
    def __init__(self, cfg: DLRMConfig):
        super().__init__()
        d = cfg.embed_dim
        self.embeddings = nn.ModuleList(nn.Embedding(v, d) for v in cfg.vocab_sizes)
        for e in self.embeddings:
            nn.init.normal_(e.weight, std=0.01)
        self.num_dense = cfg.num_dense
        self.bottom = _mlp([cfg.num_dense, *cfg.bottom, d], cfg.dropout, last_relu=True) if cfg.num_dense else None
        vectors = len(cfg.vocab_sizes) + (1 if cfg.num_dense else 0)
        pairs = vectors * (vectors - 1) // 2
        self.top = _mlp([pairs + (d if cfg.num_dense else 0), *cfg.top, 1], cfg.dropout, last_relu=False)
        rows, cols = torch.triu_indices(vectors, vectors, offset=1)
        self.register_buffer("pair_rows", rows, persistent=False)
        self.register_buffer("pair_cols", cols, persistent=False)

    def forward(self, sparse: torch.Tensor, dense: torch.Tensor | None = None) -> torch.Tensor:
        vecs = [e(sparse[:, i]) for i, e in enumerate(self.embeddings)]
        parts = []
        if self.bottom is not None:
            if dense is None:
                raise ValueError(f"This DLRM takes {self.num_dense} dense features; pass them as the second input.")
            x = self.bottom(dense)
            vecs.insert(0, x)
            parts.append(x)
        t = torch.stack(vecs, dim=1)                       # [B, V, D]
        dots = torch.bmm(t, t.transpose(1, 2))             # [B, V, V]
        parts.append(dots[:, self.pair_rows, self.pair_cols])
        return self.top(torch.cat(parts, dim=1)).squeeze(1)


@register_model("dlrm", DLRMConfig)
def build_dlrm(cfg: DLRMConfig) -> nn.Module:
    return DLRM(cfg)
