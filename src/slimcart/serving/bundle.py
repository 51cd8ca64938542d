"""A saved model folder that serves on its own: the weights and slimcart.json, plus
``preprocess.json`` (how raw inputs become the model's inputs, and which data the model was
trained on) and the files it names (a tokenizer, vocabularies)."""
from __future__ import annotations

import json
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from .. import artifact
from ..errors import DataError, UsageError
from . import preprocess

PREPROCESS = "preprocess.json"
VERSION = 1


class DataRecordWarning(UserWarning):
    """A model folder saved without a record of its training data (older slimcart)."""


def write_bundle_files(task, folder: str | Path) -> dict[str, Any]:
    """Write ``preprocess.json`` and the task's serving files into a saved model folder.
    Returns what slimcart.json records: ``{"preprocess": ..., "data": task.data_record()}``."""
    folder = Path(folder)
    spec = task.serving_spec()
    files = task.write_serving_files(folder)
    record = task.data_record()
    doc = {"version": VERSION, "task": task.name, "spec": spec, "files": files, "data": record}
    (folder / PREPROCESS).write_text(json.dumps(doc, indent=2, ensure_ascii=False))
    return {"preprocess": PREPROCESS, "data": record, "serving_files": [PREPROCESS, *files]}


def saved_data_record(folder: str | Path) -> dict[str, Any] | None:
    """The data record of a saved model: slimcart.json's ``data``, else preprocess.json's."""
    folder = Path(folder)
    record = artifact.read_meta(folder).get("data")
    if not record and (folder / PREPROCESS).is_file():
        record = json.loads((folder / PREPROCESS).read_text()).get("data")
    return record or None


def check_model_data(saved: dict[str, Any] | None, task, *, model: str = "the model",
                     strict: bool = False) -> None:
    """Refuse (UsageError) a model trained on another dataset, split seed or data than ``task``
    holds: its test rows could be rows it was trained on. A folder without a record (saved
    by an older slimcart) cannot be checked: a DataRecordWarning, or an error when ``strict``."""
    if not saved:
        msg = (f"{model} has no record of the data it was trained on (saved by an older slimcart), "
               "so it cannot be checked that its training rows stay out of this run's test split.")
        if strict:
            raise UsageError(msg, "Save the model again with this slimcart version.")
        warnings.warn(msg, DataRecordWarning, stacklevel=2)
        return
    now = task.data_record()
    if saved.get("fingerprint") == now["fingerprint"]:
        return
    was = f"{model} was trained on {saved.get('dataset')} with split seed {saved.get('split_seed')}"
    if saved.get("task") not in (None, task.name) or saved.get("dataset") != now["dataset"]:
        raise UsageError(f"{was}; this run uses {now['dataset']}: its scores here would not be "
                         "those of a model trained on this data.",
                         f"Use --dataset {saved.get('dataset')}, or train a model on {now['dataset']}.")
    if saved.get("split_seed") != now["split_seed"]:
        raise UsageError(f"{was}; this run uses seed {now['split_seed']}: its test rows would overlap "
                         "the rows the model was trained on.",
                         f"Use --seed {saved.get('split_seed')}, or train a model for this split.")
    raise UsageError(f"{was}, but the data loaded now differs (rows {saved.get('rows')} from "
                     f"{saved.get('source')}; now {now['rows']} from {now['source']}): the files or "
                     "the loading options changed, so its test rows may be rows it was trained on.",
                     "Use the data the model was trained on, or train a model on this data.")


def _runner(state, runtime: str, names: tuple[str, ...], folder: Path, tmp: Path):
    """A runner of the registered runtime ``runtime`` on the artifact it serves for ``folder``."""
    from ..formats import served_state
    from ..measure.runtimes import parse_choice, set_threads

    choice = parse_choice(runtime)
    served, _, _ = served_state(folder, state, choice.runtime.family, tmp)
    return choice.runner(served, names, set_threads(None))


@dataclass
class Bundle:
    folder: Path
    meta: dict[str, Any]
    spec: dict[str, Any]
    data: dict[str, Any] | None
    preprocessor: Any
    _state: Any = field(repr=False, default=None)
    _runners: dict = field(repr=False, default_factory=dict)
    _tmp: Any = field(repr=False, default=None)

    @property
    def task(self) -> str:
        return self.meta.get("task", {}).get("name") or self.spec.get("task")

    @property
    def runtimes(self) -> list[str]:
        """Runtimes that can serve this folder's model (as it is, or its saved/converted ONNX)."""
        from ..formats import runtimes_for

        return runtimes_for(self.meta["format"])

    def encode(self, raw) -> tuple[torch.Tensor, ...]:
        """The model inputs for ``raw`` as one batch."""
        items, _ = self.preprocessor.read(raw)
        return self.preprocessor.encode(items)

    def predict(self, raw, runtime: str | None = None, *, limit: int | None = None,
                batch_size: int = 256) -> pd.DataFrame:
        """Predictions for raw inputs. Classification: ``label`` and ``score`` (the softmax
        probability of the label); ctr: ``probability``. Image files and texts come with an
        ``input`` column; table rows keep their index. Rows are run ``batch_size`` at a time
        (text is trimmed per batch, as in the task)."""
        fn = self.runner(runtime or self.runtimes[0])
        items, names = self.read(raw)
        if limit is not None:
            items, names = _rows(items, 0, limit), (names[:limit] if names else names)
        if len(items) == 0:
            raise DataError("The input holds no rows to predict.")
        outs = [fn(self.preprocessor.encode(_rows(items, s, s + batch_size)))
                for s in range(0, len(items), batch_size)]
        index = items.index if isinstance(items, pd.DataFrame) else None
        return self.postprocess(np.concatenate(outs), names, index)

    # ---- the steps of predict, for a server that batches several requests into one call ----------

    def read(self, raw) -> tuple[Any, list[str] | None]:
        """Raw input -> (items: a list or a DataFrame, a name per item or None)."""
        return self.preprocessor.read(raw)

    def collate(self, parts: list[tuple[torch.Tensor, ...]]) -> tuple[torch.Tensor, ...]:
        """Several ``encode`` results -> one batch, the same tensors ``encode`` gives for all their
        items at once: concatenated along the batch axis, token ids and masks padded to the
        longest (the tokenizer's pad id, mask 0), as the task's collate trims a batch."""
        if len(parts) == 1:
            return parts[0]
        if self.spec["kind"] == "text":
            tok = self.preprocessor.tokenizer
            length = max(p[0].shape[1] for p in parts)
            parts = [(_pad(ids, length, tok.pad_token_id or 0), _pad(mask, length, 0)) for ids, mask in parts]
        return tuple(torch.cat(ts) for ts in zip(*parts))

    def outputs(self, logits: np.ndarray) -> dict[str, Any]:
        """Model outputs -> the prediction columns: ``probability`` (ctr), else ``label`` and
        ``score`` (the softmax probability of the label)."""
        logits = np.asarray(logits).astype(np.float64)
        if self.spec["kind"] in ("table", "ids"):
            return {"probability": 1.0 / (1.0 + np.exp(-logits.reshape(-1)))}
        e = np.exp(logits - logits.max(1, keepdims=True))
        prob = e / e.sum(1, keepdims=True)
        best = prob.argmax(1)
        classes = self.spec["classes"]
        return {"label": [classes[i] for i in best], "score": prob[np.arange(len(best)), best]}

    def postprocess(self, logits: np.ndarray, names: list[str] | None = None, index=None) -> pd.DataFrame:
        """Model outputs -> the table ``predict`` returns (``input`` first where ``names``)."""
        df = pd.DataFrame(self.outputs(logits), index=index)
        if names:
            df.insert(0, "input", names)
        return df

    @property
    def default_runtime(self) -> str:
        """ONNX Runtime where the folder holds an ONNX model (its own or ``served/onnxruntime``),
        else the first runtime that serves it."""
        from ..formats import get

        has_onnx = "onnxruntime" in get(self.meta["format"]).serves or \
            (self.folder / "served" / "onnxruntime" / artifact.META).is_file()
        return "onnxruntime" if has_onnx and "onnxruntime" in self.runtimes else self.runtimes[0]

    def runner(self, runtime: str):
        """The callable that runs the model in ``runtime``: input tensors -> numpy outputs."""
        if runtime not in self.runtimes:
            raise UsageError(f"{self.folder} ({self.meta['format']}) cannot run in {runtime!r}.",
                             f"Use one of: {', '.join(self.runtimes)}.")
        if runtime not in self._runners:
            if self._tmp is None:
                self._tmp = tempfile.TemporaryDirectory(prefix="slimcart-bundle-")
            self._runners[runtime] = _runner(self._state, runtime, tuple(self.meta["inputs"]),
                                             self.folder, Path(self._tmp.name))
        return self._runners[runtime]


def _pad(t: torch.Tensor, length: int, value: int) -> torch.Tensor:
    """Right-pad a [batch, tokens] tensor to ``length`` tokens (encode pads and trims on the right)."""
    return t if t.shape[1] == length else torch.nn.functional.pad(t, (0, length - t.shape[1]), value=value)


def _rows(items, start: int, stop: int):
    return items.iloc[start:stop] if isinstance(items, pd.DataFrame) else items[start:stop]


def load_bundle(folder: str | Path) -> Bundle:
    """A saved model folder with its preprocessing, ready for ``predict`` on raw inputs."""
    folder = Path(folder)
    meta = artifact.read_meta(folder)
    path = folder / (meta.get("preprocess") or PREPROCESS)
    if not path.is_file():
        raise UsageError(f"{folder} has no {PREPROCESS}: it was saved by an older slimcart, without "
                         "the preprocessing that turns raw inputs into model inputs.",
                         "Save the model again with this slimcart version, or add the files with "
                         "slimcart.serving.write_bundle_files(task, FOLDER), the task loaded with the "
                         "dataset and --seed the model was trained with.")
    try:
        doc = json.loads(path.read_text())
        spec = doc["spec"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise DataError(f"{path} is damaged ({type(exc).__name__}: {exc}).", "Save the model again.") from None
    if doc.get("version", 0) > VERSION:
        raise UsageError(f"{path} was written by a newer slimcart (version {doc['version']}).",
                         "Upgrade slimcart.")
    spec = {**spec, "task": doc.get("task")}
    pre = preprocess.build(spec, folder)
    return Bundle(folder, meta, spec, meta.get("data") or doc.get("data"), pre, artifact.load(folder))
