"""What flows between pipeline stages: the model state, the context a stage may use, and the
report a stage returns (what it changed and what it skipped, with the reason, per layer)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .registry import ONNX, TORCH

if TYPE_CHECKING:
    from .tasks.base import Task


@dataclass
class ModelState:
    """The model as it stands after some stages.

    ``torch_model`` is the eager module (float or quantized); ``onnx_path`` is set once the
    model has been exported. ``spec`` rebuilds the float architecture (see models/registry).
    """

    format: str
    spec: dict[str, Any]
    torch_model: torch.nn.Module | None = None
    onnx_path: Path | None = None
    quant: dict[str, Any] = field(default_factory=dict)  # how torch_int8 layers were made

    @classmethod
    def from_module(cls, model: torch.nn.Module, spec: dict[str, Any]) -> "ModelState":
        return cls(format=TORCH, spec=spec, torch_model=model.eval())

    def require_onnx(self) -> Path:
        if self.format != ONNX or self.onnx_path is None:
            raise RuntimeError("this stage needs an exported ONNX model")
        return self.onnx_path


@dataclass
class StageReport:
    technique: str
    config: dict[str, Any]
    changed: dict[str, str] = field(default_factory=dict)   # layer -> what changed
    skipped: dict[str, str] = field(default_factory=dict)   # layer -> why it was left alone
    stats: dict[str, Any] = field(default_factory=dict)     # achieved sparsity, parity error...
    notes: list[str] = field(default_factory=list)          # what a user should read (copied to the variant)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"technique": self.technique, "config": self.config, "changed": self.changed,
                "skipped": self.skipped, "stats": self.stats, "notes": self.notes, "seconds": round(self.seconds, 3)}


@dataclass
class StageContext:
    """What a stage may use: the task (data, fine-tuning, example inputs) and a work folder."""

    task: "Task"
    workdir: Path
    stage_index: int = 0
    progress: bool = True
    checkpoints: Path | None = None  # where this variant's training stages keep resumable checkpoints

    def train_checkpoint(self, name: str) -> dict[str, Any]:
        """Keywords for ``Task.train_model``: a checkpoint folder for this stage's training ``name``,
        written at each epoch's end, from which a rerun resumes; none without ``checkpoints``."""
        if self.checkpoints is None:
            return {}
        return {"checkpoint_dir": self.checkpoints / f"stage{self.stage_index}-{name}", "checkpoint_every": "epoch"}

    def keep(self, name: str) -> Path:
        """A folder whose files are kept with the saved variant (``<variant>/checkpoints/<name>``)."""
        p = self.workdir / "checkpoints" / f"stage{self.stage_index}-{name}"
        p.mkdir(parents=True, exist_ok=True)
        return p

    def path(self, name: str) -> Path:
        p = self.workdir / f"stage{self.stage_index}-{name}"
        p.parent.mkdir(parents=True, exist_ok=True)
        return p
