"""Product photo recognition with a small ResNet-style CNN."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data import paths
from ..errors import UsageError, closest
from ..models.cnn import CNNConfig, ResNetSmall
from .base import Split, Task, TrainConfig
from .common import ClassificationMixin, split_indices

DATASETS = {"fashion-mnist": "Zalando product photos, 28x28 grey, 10 classes (MIT)"}


def _to_tensor(x: np.ndarray, mean: float, std: float) -> torch.Tensor:
    """uint8 [N,H,W] or [N,H,W,C] -> float32 [N,C,H,W], normalised."""
    t = torch.from_numpy(x)
    t = t.unsqueeze(1) if t.ndim == 3 else t.permute(0, 3, 1, 2)
    return ((t.float() / 255.0) - mean) / std


@dataclass
class ProductImageTask(ClassificationMixin, Task):
    name = "product_image"
    metric_names = ("accuracy", "macro_f1")
    primary_metric = "accuracy"
    input_names = ("pixels",)

    @classmethod
    def load(cls, dataset: str = "fashion-mnist", data_dir=None, image_size: int = 32,
             seed: int = 0, **_: Any) -> "ProductImageTask":
        from ..data import images

        if dataset == "fashion-mnist":
            folder = paths.find(["images/fashion-mnist"], "fashion-mnist", data_dir)
            xtr, ytr, xte, yte = images.load_fashion_mnist(folder)
            classes, source = list(images.FASHION_MNIST_CLASSES), str(folder)
        else:
            root = Path(dataset)
            if not root.is_dir():
                raise UsageError(f"Unknown product_image dataset {dataset!r}.{closest(dataset, list(DATASETS))}",
                                 "Use fashion-mnist or an ImageFolder directory (train/ and test/ "
                                 "or val/, one sub-folder per class).")
            xtr, ytr, xte, yte, classes = images.load_image_folder(root, image_size=image_size)
            source = str(root)
        xtr_t = torch.from_numpy(xtr)
        mean = float(xtr_t.float().mean() / 255.0)
        std = float(xtr_t.float().std() / 255.0) or 1.0
        tr, va, _ = split_indices(ytr, (1 / 12, 0.0), seed)
        train = Split((_to_tensor(xtr, mean, std),), torch.as_tensor(ytr, dtype=torch.long))
        splits = {"train": train.take(tr), "val": train.take(va),
                  "test": Split((_to_tensor(xte, mean, std),), torch.as_tensor(yte, dtype=torch.long))}
        shape = tuple(splits["train"].inputs[0].shape[1:])
        info = {"classes": classes, "num_classes": len(classes), "source": source,
                "input_shape": list(shape), "normalise": {"mean": mean, "std": std}, "split_seed": seed}
        return cls(dataset=dataset if dataset in DATASETS else source, splits=splits, info=info)

    def build_baseline(self, seed: int = 0):
        torch.manual_seed(seed)
        c, h, _ = self.info["input_shape"]
        cfg = CNNConfig(in_channels=c, num_classes=self.info["num_classes"], image_size=h)
        return ResNetSmall(cfg), {"arch": "resnet_small", "config": cfg.model_dump(mode="json")}

    def train_config(self, budget: str = "full") -> TrainConfig:
        epochs = {"full": 3.0, "demo": 1.0, "test": 0.05}.get(budget, 1.0)
        return TrainConfig(epochs=epochs, batch_size=128, lr=3e-3, weight_decay=5e-4, warmup_ratio=0.02)

    def serving_spec(self):
        c, h, w = self.info["input_shape"]
        norm = self.info["normalise"]
        return {"kind": "image", "classes": self.info["classes"], "channels": c, "height": h,
                "width": w, "mode": "L" if c == 1 else "RGB",
                "resize": "PIL convert(mode), then resize((width, height), BILINEAR)",
                "scale": 255.0, "mean": norm["mean"], "std": norm["std"]}
