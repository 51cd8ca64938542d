"""Product photo recognition: ImageNet-pretrained EfficientNet-Lite0 on photos (ImageFolder), a
small ResNet-style CNN on Fashion-MNIST and tiny images."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data import paths
from ..errors import UsageError, closest
from ..models import efficientnet
from ..models.cnn import CNNConfig, ResNetSmall
from ..models.registry import spec
from .base import Split, Task, TrainConfig
from .common import ClassificationMixin, split_indices

DATASETS = {"fashion-mnist": "Zalando product photos, 28x28 grey, 10 classes (MIT)"}
BASELINES = {"efficientnet_lite0": "EfficientNet-Lite0, ImageNet-pretrained, fine-tuned (RGB, 224 px)",
             "resnet_small": "small ResNet-style CNN trained from scratch"}
SMALL_IMAGES = 64  # an ImageFolder loaded below this side length defaults to resnet_small
HEAD_LR_SCALE = 10.0  # a pretrained body's new classifier learns this much faster


def _to_tensor(x: np.ndarray, mean, std) -> torch.Tensor:
    """uint8 [N,H,W] or [N,H,W,C] -> float32 [N,C,H,W], normalised (per channel if lists)."""
    from ..data.images import normalise

    t = torch.from_numpy(x)
    return normalise(t.unsqueeze(1) if t.ndim == 3 else t.permute(0, 3, 1, 2), mean, std)


def _choose(dataset: str, baseline: str | None, image_size: int | None) -> tuple[str, int]:
    """The baseline (which also fixes the pixels' normalisation) and the image size."""
    photos = dataset != "fashion-mnist"
    if baseline is None:
        small = image_size is not None and image_size < SMALL_IMAGES
        baseline = "efficientnet_lite0" if photos and not small else "resnet_small"
    if baseline not in BASELINES:
        raise UsageError(f"Unknown product_image baseline {baseline!r}.{closest(str(baseline), list(BASELINES))}",
                         f"Known baselines: {', '.join(BASELINES)}.")
    if baseline == "efficientnet_lite0" and not photos:
        raise UsageError("efficientnet_lite0 takes RGB photos; fashion-mnist is 28x28 grey.",
                         "Use baseline resnet_small (the default for fashion-mnist), or an ImageFolder of photos.")
    if image_size is None:
        image_size = efficientnet.IMAGE_SIZE if baseline == "efficientnet_lite0" else 32
    return baseline, image_size


@dataclass
class ProductImageTask(ClassificationMixin, Task):
    name = "product_image"
    metric_names = ("accuracy", "macro_f1")
    primary_metric = "accuracy"
    input_names = ("pixels",)

    @classmethod
    def load(cls, dataset: str = "fashion-mnist", data_dir=None, image_size: int | None = None,
             seed: int = 0, baseline: str | None = None, **_: Any) -> "ProductImageTask":
        """``baseline``: efficientnet_lite0 (default for an ImageFolder, at 224 px unless
        ``image_size`` is given; under 64 px the default is resnet_small) or resnet_small (default
        for fashion-mnist; ImageFolders at 32 px unless ``image_size`` is given)."""
        from ..data import images

        baseline, image_size = _choose(dataset, baseline, image_size)
        pretrained = baseline == "efficientnet_lite0"
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
            xtr, ytr, xte, yte, classes = images.load_image_folder(
                root, image_size=image_size, grayscale=False if pretrained else None)
            source = str(root)
        if pretrained:  # the normalisation the ImageNet weights were trained with
            mean, std = list(efficientnet.MEAN), list(efficientnet.STD)
        else:  # the train split's statistics
            xtr_t = torch.from_numpy(xtr)
            mean = float(xtr_t.float().mean() / 255.0)
            std = float(xtr_t.float().std() / 255.0) or 1.0
        tr, va, _ = split_indices(ytr, (1 / 12, 0.0), seed)
        train = Split((_to_tensor(xtr, mean, std),), torch.as_tensor(ytr, dtype=torch.long))
        splits = {"train": train.take(tr), "val": train.take(va),
                  "test": Split((_to_tensor(xte, mean, std),), torch.as_tensor(yte, dtype=torch.long))}
        shape = tuple(splits["train"].inputs[0].shape[1:])
        info = {"classes": classes, "num_classes": len(classes), "source": source,
                "input_shape": list(shape), "normalise": {"mean": mean, "std": std}, "split_seed": seed,
                "baseline": baseline}
        return cls(dataset=dataset if dataset in DATASETS else source, splits=splits, info=info)

    def _pretrained(self) -> bool:
        return self.info.get("baseline") == "efficientnet_lite0"

    def build_baseline(self, seed: int = 0):
        torch.manual_seed(seed)
        if self._pretrained():  # ImageNet weights, a fresh classifier; the saved spec needs no package
            cfg = efficientnet.EfficientNetLite0Config(num_classes=self.info["num_classes"], pretrained=True)
            model = efficientnet.build_efficientnet_lite0(cfg)
            return model, spec("efficientnet_lite0", cfg.model_copy(update={"pretrained": False}))
        c, h, _ = self.info["input_shape"]
        cfg = CNNConfig(in_channels=c, num_classes=self.info["num_classes"], image_size=h)
        return ResNetSmall(cfg), {"arch": "resnet_small", "config": cfg.model_dump(mode="json")}

    def train_config(self, budget: str = "full") -> TrainConfig:
        if self._pretrained():  # fine-tuning: the body at lr, the new classifier faster (param_groups)
            epochs = {"full": 5.0, "demo": 1.0, "test": 0.05}.get(budget, 1.0)
            return TrainConfig(epochs=epochs, batch_size=32, lr=2e-4, weight_decay=0.01, warmup_ratio=0.05)
        epochs = {"full": 3.0, "demo": 1.0, "test": 0.05}.get(budget, 1.0)
        return TrainConfig(epochs=epochs, batch_size=128, lr=3e-3, weight_decay=5e-4, warmup_ratio=0.02)

    def param_groups(self, model, cfg):
        if not self._pretrained():
            return super().param_groups(model, cfg)
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        head = [p for n, p in named if n.startswith("classifier.")]
        body = [p for n, p in named if not n.startswith("classifier.")]
        groups = [{"params": body, "lr": cfg.lr}, {"params": head, "lr": cfg.lr * HEAD_LR_SCALE}]
        return [g for g in groups if g["params"]]

    def serving_spec(self):
        c, h, w = self.info["input_shape"]
        norm = self.info["normalise"]
        return {"kind": "image", "classes": self.info["classes"], "channels": c, "height": h,
                "width": w, "mode": "L" if c == 1 else "RGB",
                "resize": "PIL convert(mode), then resize((width, height), BILINEAR)",
                "scale": 255.0, "mean": norm["mean"], "std": norm["std"],
                "normalised_for": self.info.get("baseline", "resnet_small")}
