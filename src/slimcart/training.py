"""Saving a trained baseline and loading it back for `compress --model`."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from . import artifact
from .errors import UsageError
from .output import staged_output
from .registry import TORCH
from .stage import ModelState
from .tasks.base import Task

TRAIN_RECORD = "train.json"


def save_trained(model: torch.nn.Module, task: Task, out: Path, overwrite: bool = False) -> Path:
    desc = {"name": task.name, "dataset": task.dataset, "classes": task.info.get("classes"),
            "num_classes": task.info.get("num_classes")}
    with staged_output(Path(out), overwrite) as stage:
        artifact.save(ModelState.from_module(model, model.slimcart_spec), stage, task=desc,
                      examples=task.example_inputs(32, "val"), input_names=task.input_names, bundle=task)
        (stage / TRAIN_RECORD).write_text(json.dumps(getattr(model, "slimcart_training", {}), indent=2))
    return Path(out)


def load_trained(folder: Path, task: Task) -> torch.nn.Module:
    """A float baseline saved by `slimcart train`, checked against the task it is used with."""
    meta = artifact.read_meta(folder)
    saved = meta.get("task", {})
    if meta["format"] != TORCH:
        raise UsageError(f"--model {folder} is a {meta['format']} model; compress starts from a float "
                         "PyTorch model saved by `slimcart train`.")
    if saved.get("name") != task.name:
        raise UsageError(f"--model {folder} was trained for task {saved.get('name')!r}, not {task.name!r}.")
    if saved.get("num_classes") != task.info.get("num_classes"):
        raise UsageError(f"--model {folder} predicts {saved.get('num_classes')} classes but dataset "
                         f"{task.dataset} has {task.info.get('num_classes')}; train it on this dataset.")
    from .serving import check_model_data, saved_data_record

    check_model_data(saved_data_record(folder), task, model=f"--model {folder}", strict=True)
    model = artifact.load(folder).torch_model
    model.slimcart_spec = meta["model"]
    record = Path(folder) / TRAIN_RECORD
    model.slimcart_training = json.loads(record.read_text()) if record.is_file() else {}
    return model
