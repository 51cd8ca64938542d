"""A multi-layer perceptron on flattened inputs; the default is LeNet-300-100 (784-300-100-10),
the fully connected network of LeCun et al. (1998) used by Deep Compression."""
from __future__ import annotations

from math import prod

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from .registry import register_model


class MLPConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    in_shape: list[int] | None = Field(default=None, min_length=1)  # e.g. [1, 28, 28]; flattened
    in_features: int | None = Field(default=None, ge=1)
    hidden: list[int] = Field(default_factory=lambda: [300, 100])
    num_classes: int = Field(default=10, ge=1)

    @model_validator(mode="after")
    def _input_size(self) -> "MLPConfig":
        if self.in_shape is None and self.in_features is None:
            self.in_shape = [1, 28, 28]
        if self.in_shape is not None and self.in_features is not None and prod(self.in_shape) != self.in_features:
            raise ValueError(f"in_features {self.in_features} is not the size of in_shape {self.in_shape}")
        if any(s < 1 for s in (self.in_shape or [])) or any(h < 1 for h in self.hidden):
            raise ValueError("in_shape and hidden sizes must be positive")
        return self

    @property
    def features(self) -> int:
        return self.in_features or prod(self.in_shape)


class MLP(nn.Module):
    def __init__(self, cfg: MLPConfig):
        super().__init__()
        sizes = [cfg.features, *cfg.hidden]
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes, sizes[1:]))
        self.head = nn.Linear(sizes[-1], cfg.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(x, 1)
        for layer in self.hidden:
            x = torch.relu(layer(x))
        return self.head(x)


@register_model("mlp", MLPConfig)
def build_mlp(cfg: MLPConfig) -> nn.Module:
    return MLP(cfg)
