"""A task: data splits + baseline model + metric + example inputs, for one workload."""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterator, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

Inputs = tuple[torch.Tensor, ...]
PREDICT_BYTES = 32 * 2**20  # inputs per scoring batch


@dataclass
class Split:
    inputs: Inputs
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def take(self, idx: torch.Tensor | np.ndarray) -> "Split":
        idx = torch.as_tensor(idx, dtype=torch.long)
        return Split(tuple(t[idx] for t in self.inputs), self.labels[idx])


class TrainConfig(BaseModel):
    """Fine-tuning / training budget. ``epochs`` may be fractional."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    epochs: float = Field(default=1.0, gt=0)
    batch_size: int = Field(default=64, ge=1)
    lr: float = Field(default=1e-3, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    warmup_ratio: float = Field(default=0.0, ge=0, lt=1)
    max_steps: int | None = Field(default=None, ge=1)
    seed: int = 0
    # Embedding tables: "rowwise_adagrad" trains every plain nn.Embedding weight with row-wise
    # Adagrad at ``table_lr`` on sparse gradients (only looked-up rows change) and the rest with AdamW.
    table_optimizer: Literal["adamw", "rowwise_adagrad"] = "adamw"
    table_lr: float | None = Field(default=None, gt=0)
    # Frequency-aware L2 on looked-up embedding rows (for tasks that define it, e.g. ctr): each
    # lookup of row i adds row_l2 * ||w_i||^2 / count_i, so every row gets the same prior whatever
    # its frequency, and rare rows are held near 0.
    row_l2: float = Field(default=0.0, ge=0)
    # Early stopping: score the validation split after every whole epoch, stop after ``patience``
    # epochs without a better primary metric, and keep the best epoch's weights.
    patience: int | None = Field(default=None, ge=1)


@dataclass
class Task(ABC):
    """Subclasses set the class attributes and implement the abstract methods."""

    name: ClassVar[str]
    metric_names: ClassVar[tuple[str, ...]]
    primary_metric: ClassVar[str]
    input_names: ClassVar[tuple[str, ...]]
    higher_is_better: ClassVar[bool] = True

    dataset: str
    splits: dict[str, Split]
    info: dict[str, Any] = field(default_factory=dict)

    # ---- model ---------------------------------------------------------------------
    @abstractmethod
    def build_baseline(self, seed: int = 0) -> tuple[torch.nn.Module, dict[str, Any]]:
        """A fresh (or pretrained-init) baseline and the spec that rebuilds it."""

    @abstractmethod
    def train_config(self, budget: str = "full") -> TrainConfig:
        """The training budget: 'full' for the stated metric, 'demo' for a quick run."""

    @abstractmethod
    def loss(self, outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def metrics(self, outputs: np.ndarray, labels: np.ndarray) -> dict[str, float]: ...

    @abstractmethod
    def agreement(self, baseline: np.ndarray, other: np.ndarray) -> dict[str, float]:
        """How close a variant's outputs are to the baseline's on the same rows."""

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        axes = {n: {0: "batch"} for n in self.input_names}
        axes["logits"] = {0: "batch"}
        return axes

    def collate(self, inputs: Inputs) -> Inputs:
        """Per-batch preparation (e.g. trimming padding); identity by default."""
        return inputs

    def param_groups(self, model: torch.nn.Module, cfg: TrainConfig) -> list[dict[str, Any]]:
        return [{"params": [p for p in model.parameters() if p.requires_grad], "lr": cfg.lr}]

    def default_terms(self, model: torch.nn.Module, cfg: TrainConfig) -> list:
        """The loss terms of a training that names none: the task's loss (tasks may add
        regularisers that ``cfg`` asks for, e.g. ctr's ``row_l2``)."""
        from ..trainer import TaskLoss

        return [TaskLoss(self)]

    # ---- data ----------------------------------------------------------------------
    def batches(self, split: str, batch_size: int, *, shuffle: bool = False, seed: int = 0,
                limit: int | None = None) -> Iterator[tuple[Inputs, torch.Tensor]]:
        data = self.splits[split]
        n = len(data) if limit is None else min(limit, len(data))
        order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:n] \
            if shuffle else torch.arange(n)
        for start in range(0, n, batch_size):
            idx = order[start:start + batch_size]
            yield self.collate(tuple(t[idx] for t in data.inputs)), data.labels[idx]

    def example_inputs(self, batch_size: int, split: str = "test") -> Inputs:
        """A real batch from the data (rows repeat if the split is smaller)."""
        data = self.splits[split]
        idx = torch.arange(batch_size) % len(data)
        return self.collate(tuple(t[idx] for t in data.inputs))

    def labels(self, split: str = "test", limit: int | None = None) -> np.ndarray:
        y = self.splits[split].labels
        return (y if limit is None else y[:limit]).numpy()

    # ---- running -------------------------------------------------------------------
    def predict(self, fn: Callable[[Inputs], np.ndarray], split: str = "test",
                limit: int | None = None, batch_size: int | None = None) -> np.ndarray:
        """``fn`` over the split in batches; by default 256 rows, fewer for large rows (at most
        ``PREDICT_BYTES`` of inputs a batch: 224 px photos go 55 at a time, since a runtime's
        memory arena keeps the peak of its largest call)."""
        if batch_size is None:
            row = sum(t[:1].numel() * t.element_size() for t in self.splits[split].inputs)
            batch_size = int(max(1, min(256, PREDICT_BYTES // max(row, 1))))
        outs = [fn(x) for x, _ in self.batches(split, batch_size, limit=limit)]
        return np.concatenate(outs, axis=0)

    def evaluate(self, model: torch.nn.Module, split: str = "test",
                 limit: int | None = None) -> dict[str, float]:
        model.eval()

        def fn(x: Inputs) -> np.ndarray:
            with torch.inference_mode():
                return model(*x).float().numpy()

        return self.metrics(self.predict(fn, split, limit), self.labels(split, limit))

    def train_model(self, model: torch.nn.Module, cfg: TrainConfig, *, progress: bool = True,
                    after_step: Callable[[torch.nn.Module], None] | None = None,
                    desc: str = "train", terms=None, callbacks=(), capture=(),
                    checkpoint_dir=None, checkpoint_every: int | str = 0) -> dict[str, Any]:
        """Train in place (AdamW, linear warm-up then linear decay), then score the
        validation split. ``after_step`` runs after each optimizer step (e.g. to re-apply
        pruning masks); the other keywords are those of ``slimcart.trainer.Trainer``."""
        from ..trainer import AfterStep, Trainer

        callbacks = [*callbacks, AfterStep(after_step)] if after_step is not None else list(callbacks)
        return Trainer(self, model, cfg, terms=terms, callbacks=callbacks, capture=capture,
                       checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every,
                       progress=progress, desc=desc).fit()

    def train_baseline(self, budget: str = "full", *, seed: int = 0, progress: bool = True,
                       config: TrainConfig | None = None, checkpoint_dir=None,
                       checkpoint_every: int = 0) -> torch.nn.Module:
        """Build and train the baseline. The returned module carries its architecture spec
        (``slimcart_spec``) and training record (``slimcart_training``). With ``checkpoint_dir``,
        training resumes from the checkpoint there, and writes one every ``checkpoint_every`` steps."""
        torch.manual_seed(seed)
        np.random.seed(seed)
        model, spec = self.build_baseline(seed)
        cfg = config or self.train_config(budget).model_copy(update={"seed": seed})
        record = self.train_model(model, cfg, progress=progress, desc=f"train {self.name}",
                                  checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every)
        record["test"] = self.evaluate(model, "test")
        record["config"] = cfg.model_dump()
        model.slimcart_spec = spec
        model.slimcart_training = record
        return model

    def describe(self) -> dict[str, Any]:
        return {"task": self.name, "dataset": self.dataset,
                "rows": {k: len(v) for k, v in self.splits.items()}, **self.info}

    # ---- serving -------------------------------------------------------------------
    def serving_spec(self) -> dict[str, Any]:
        """How raw inputs become this task's model inputs, as JSON (see slimcart.serving)."""
        from ..errors import UsageError

        raise UsageError(f"Task {self.name!r} does not describe its preprocessing, so its "
                         "models cannot be saved as a bundle that serves on its own.")

    def write_serving_files(self, folder) -> list[str]:
        """Write the files ``serving_spec`` refers to into ``folder``; their relative paths."""
        return []

    def data_record(self) -> dict[str, Any]:
        """Which data and split a model is trained on; checked when the model is reused."""
        return {"task": self.name, "dataset": self.dataset, "source": self.info.get("source"),
                "split_seed": self.info.get("split_seed"), "fingerprint": self.fingerprint(),
                "rows": {k: len(v) for k, v in self.splits.items()}}

    def fingerprint(self) -> str:
        """sha256 over every split's input and label tensors (dtype, shape and values)."""
        import hashlib

        h = hashlib.sha256()
        for name, split in self.splits.items():
            for t in (*split.inputs, split.labels):
                a = np.ascontiguousarray(t.detach().cpu().numpy())
                h.update(f"{name}:{a.dtype}:{a.shape};".encode())
                h.update(a.data)
        return h.hexdigest()
