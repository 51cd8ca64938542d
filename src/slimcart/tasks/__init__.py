"""Built-in tasks, by name."""
from __future__ import annotations

from ..errors import UsageError, closest
from .base import Split, Task, TrainConfig  # noqa: F401
from .ctr import CTRTask
from .intent import IntentTask
from .product_image import ProductImageTask

TASKS: dict[str, type[Task]] = {"intent": IntentTask, "product_image": ProductImageTask, "ctr": CTRTask}
DEFAULT_DATASET = {"intent": "bitext", "product_image": "fashion-mnist", "ctr": "womens-reviews"}
SUMMARY = {
    "intent": "customer-service intent classification; fine-tuned MiniLM-L6 + mean pooling + linear head",
    "product_image": "product photo recognition; ImageNet-pretrained EfficientNet-Lite0 on photo folders, "
                     "small ResNet-style CNN on Fashion-MNIST",
    "ctr": "click / conversion prediction; DeepFM with one embedding table per categorical field",
}


def datasets(task: str) -> dict[str, str]:
    from . import ctr, intent, product_image

    return {"intent": intent.DATASETS, "product_image": product_image.DATASETS,
            "ctr": ctr.DATASETS}[task]


def load_task(name: str, dataset: str | None = None, *, data_dir=None, seed: int = 0, **options) -> Task:
    """Load a task with its data splits. ``options`` are the table-column options
    (text_column, label_column, categorical, dense), image_size and product_image's baseline."""
    if name not in TASKS:
        raise UsageError(f"Unknown task {name!r}.{closest(name, list(TASKS))}",
                         f"Known tasks: {', '.join(TASKS)} (see `slimcart tasks`).")
    return TASKS[name].load(dataset or DEFAULT_DATASET[name], data_dir=data_dir, seed=seed, **options)
