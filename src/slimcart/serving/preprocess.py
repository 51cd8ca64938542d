"""Raw inputs -> a model's input tensors, built from a bundle's preprocess.json and files alone.

Each preprocessor repeats what its task's ``load`` and ``collate`` do to the training data, so
a saved model is served the same tensors it was trained and scored on. ``read`` turns raw input
into items (a list or a DataFrame) plus, where there is one, a column naming each item;
``encode`` turns a slice of items into the input tensors.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from ..data.tables import is_table, read_table, require_columns
from ..errors import DataError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
_INT = re.compile(r"[+-]?\d+")


def build(spec: dict[str, Any], folder: Path):
    kinds = {"text": TextPreprocessor, "image": ImagePreprocessor, "table": TablePreprocessor,
             "ids": IdsPreprocessor}
    if spec.get("kind") not in kinds:
        raise DataError(f"{folder}: unknown preprocessing kind {spec.get('kind')!r}.",
                        "The bundle was written by a newer slimcart; upgrade slimcart.")
    return kinds[spec["kind"]](spec, Path(folder))


def _as_path(raw) -> Path | None:
    return Path(raw) if isinstance(raw, os.PathLike) else None


def _table(path: Path, str_columns: list[str] = ()) -> pd.DataFrame:
    name = path.name.lower()
    if not (".parquet" in name or name.endswith(".pq")) and path.is_file():
        try:
            return pd.read_csv(path, sep="\t" if name.endswith(".tsv") else ",",
                               dtype={c: str for c in str_columns})
        except Exception as exc:  # pandas raises many types for a broken file
            raise DataError(f"Cannot read {path} as a table: {type(exc).__name__}: {exc}",
                            "Give a CSV (comma-separated, with a header row) or a parquet file.") from None
    return read_table(path)


class TextPreprocessor:
    """Texts -> (input_ids, attention_mask): the task's tokenizer call, then collate's trim."""

    def __init__(self, spec: dict[str, Any], folder: Path):
        from transformers import AutoTokenizer

        self.spec = spec
        path = folder / spec["tokenizer"]
        if not path.is_dir():
            raise DataError(f"{path} is missing; the model folder is incomplete.", "Save the model again.")
        self.tokenizer = AutoTokenizer.from_pretrained(str(path))

    def read(self, raw) -> tuple[list[str], list[str]]:
        """A string, a list of strings, a DataFrame with the text column, or a Path to a
        table (CSV/parquet, with that column) or to a .txt file (one text per non-empty line)."""
        col, path = self.spec["text_column"], _as_path(raw)
        if path is not None:
            if not path.is_file():
                raise DataError(f"Input file {path} does not exist.")
            if not is_table(path):
                raw = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
            else:
                raw = _table(path)
        if isinstance(raw, pd.DataFrame):
            require_columns(raw, {"text column": col}, "input")
            raw = raw[col]
        if isinstance(raw, str):
            raw = [raw]
        texts = pd.Series(list(raw), dtype=object).fillna("").astype(str).tolist()  # as load
        return texts, texts

    def encode(self, texts: list[str]) -> tuple[torch.Tensor, ...]:
        enc = self.tokenizer(list(texts), padding="max_length", truncation=True,
                             max_length=self.spec["max_length"], return_tensors="pt")
        ids, mask = enc["input_ids"], enc["attention_mask"]
        length = max(1, int(mask.sum(1).max()))  # IntentTask.collate
        return ids[:, :length].contiguous(), mask[:, :length].contiguous()


class ImagePreprocessor:
    """Image files or uint8 arrays -> normalised float pixels [N, C, H, W].

    Files are decoded, converted and resized by the same function that loads an ImageFolder
    (data.images._open: PIL convert(mode), then a bilinear resize). uint8 arrays of the model's
    size and channels are used as they are, as the task uses its arrays; others go through PIL
    the same way as files."""

    def __init__(self, spec: dict[str, Any], folder: Path):
        self.spec = spec
        self.shape = (spec["height"], spec["width"], spec["channels"])

    def read(self, raw) -> tuple[list, list[str] | None]:
        """A path (image file or folder, searched recursively), a list of paths, a uint8 array
        [N, H, W(, C)], or a list of uint8 arrays [H, W(, C)]."""
        if isinstance(raw, np.ndarray):
            if raw.ndim not in (3, 4):
                raise DataError(f"An image batch must be uint8 [N, H, W] or [N, H, W, C]; got shape {raw.shape}.",
                                "Pass one image as a list: [image].")
            return list(raw), None
        items = [raw] if isinstance(raw, (str, os.PathLike)) else list(raw)
        files: list = []
        for item in items:
            if isinstance(item, np.ndarray):
                files.append(item)
                continue
            p = Path(item)
            if p.is_dir():
                found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES
                               and not any(s.startswith(".") for s in f.relative_to(p).parts))
                if not found:
                    raise DataError(f"Folder {p} holds no image files ({', '.join(IMAGE_SUFFIXES)}).")
                files += found
            elif p.is_file():
                files.append(p)
            else:
                raise DataError(f"Image {p} does not exist.")
        names = [str(f) if isinstance(f, Path) else "<array>" for f in files]
        return files, (names if any(isinstance(f, Path) for f in files) else None)

    def _pixels(self, item) -> np.ndarray:
        from ..data.images import _open

        h, w, c = self.shape
        mode = self.spec["mode"]
        if isinstance(item, Path):
            if h != w:
                raise DataError(f"This model takes {h}x{w} images; slimcart trains square ones only.")
            try:
                return _open(item, mode, h).reshape(self.shape)
            except DataError as exc:
                raise DataError(exc.message, "Give image files PIL can read (JPEG, PNG...).") from None
        a = np.asarray(item)
        if a.dtype != np.uint8:
            raise DataError(f"Image arrays must be uint8 (0..255); got {a.dtype}.")
        if a.ndim == 2:
            a = a[..., None]
        if a.ndim != 3:
            raise DataError(f"An image array must be [H, W] or [H, W, C]; got shape {a.shape}.")
        if a.shape == self.shape:
            return a
        from PIL import Image

        img = Image.fromarray(a[..., 0] if a.shape[2] == 1 else a)
        img = img.convert(mode).resize((w, h), Image.Resampling.BILINEAR)
        return np.asarray(img, dtype=np.uint8).reshape(self.shape)

    def encode(self, items: list) -> tuple[torch.Tensor, ...]:
        x = np.stack([self._pixels(i) for i in items])
        # As product_image._to_tensor, layout included: RGB pixels stay channels-last in memory,
        # and convolutions round differently per layout.
        from ..data.images import normalise

        t = torch.from_numpy(x).permute(0, 3, 1, 2)
        return (normalise(t, self.spec["mean"], self.spec["std"]),)


def _rows(raw, str_columns: list[str]) -> pd.DataFrame:
    path = _as_path(raw) or (Path(raw) if isinstance(raw, str) else None)
    if path is not None:
        if not path.is_file():
            raise DataError(f"Input file {path} does not exist.")
        return _table(path, str_columns)
    if isinstance(raw, dict):
        return pd.DataFrame([raw])
    if isinstance(raw, pd.DataFrame):
        return raw
    return pd.DataFrame(list(raw))


def _category_key(v, kind: str) -> str:
    """The vocabulary key of a raw value: _encode_categorical's str(v) and "<missing>", after
    putting a value read back from text into the training column's type."""
    try:
        if pd.isna(v):
            return "<missing>"
    except (TypeError, ValueError):
        pass
    if kind in ("integer", "float") and not isinstance(v, (bool, np.bool_)):
        text = str(v).strip()
        try:
            if kind == "integer":
                return str(int(text)) if _INT.fullmatch(text) else (
                    str(int(float(text))) if float(text).is_integer() else str(v))
            return str(float(text))
        except ValueError:
            return str(v)
    return str(v)


class TablePreprocessor:
    """Rows with the named columns -> (sparse ids, dense floats), as CTRTask.load encodes them:
    values missing from a column's training vocabulary get the fallback id 0; dense values go
    through the same fill, log1p and normalisation."""

    def __init__(self, spec: dict[str, Any], folder: Path):
        self.spec = spec
        path = folder / spec["vocab"]
        if not path.is_file():
            raise DataError(f"{path} is missing; the model folder is incomplete.", "Save the model again.")
        self.vocab = json.loads(path.read_text())
        derived = spec.get("derived", {})
        cats = [c["column"] for c in spec["categorical"]]
        self.str_columns = [c for c in cats if c not in derived]
        self.columns = self.str_columns + [d["from"] for d in derived.values()] + \
            [d["column"] for d in spec["dense"]]

    def read(self, raw) -> tuple[pd.DataFrame, None]:
        """A DataFrame, a Path/str to a CSV or parquet file, a dict (one row) or a list of dicts."""
        df = _rows(raw, self.str_columns)
        require_columns(df, {"input": list(dict.fromkeys(self.columns))}, "input rows")
        return df, None

    def encode(self, df: pd.DataFrame) -> tuple[torch.Tensor, ...]:
        df = df.copy()
        for name, d in self.spec.get("derived", {}).items():
            src = _numeric(df[d["from"]], d["from"])
            df[name] = (src // d["floordiv"]).astype(d["dtype"])
        sparse = np.zeros((len(df), len(self.spec["categorical"])), dtype=np.int64)
        for j, c in enumerate(self.spec["categorical"]):
            ids = self.vocab[c["column"]]
            sparse[:, j] = [ids.get(_category_key(v, c["kind"]), 0) for v in df[c["column"]]]
        out = (torch.as_tensor(sparse),)
        if self.spec["dense"]:
            dense = np.zeros((len(df), len(self.spec["dense"])), np.float32)
            for j, n in enumerate(self.spec["dense"]):
                x = _numeric(df[n["column"]], n["column"]).astype(float).fillna(0.0).to_numpy()
                if n["log1p"]:
                    if (x < 0).any():
                        raise DataError(f"Dense column {n['column']!r} has negative values; the model "
                                        "was trained on log1p of values >= 0 in it.")
                    x = np.log1p(x)
                dense[:, j] = (x - n["mean"]) / n["std"]
            out += (torch.as_tensor(dense),)
        return out


def _numeric(col: pd.Series, name: str) -> pd.Series:
    try:
        return pd.to_numeric(col, errors="raise")
    except (ValueError, TypeError):
        raise DataError(f"Column {name!r} of the input rows is not numeric.") from None


class IdsPreprocessor:
    """Generated click logs: integer ids used as they are, dense values as float32."""

    def __init__(self, spec: dict[str, Any], folder: Path):
        self.spec = spec

    def read(self, raw) -> tuple[pd.DataFrame, None]:
        df = _rows(raw, [])
        require_columns(df, {"input": self.spec["categorical"] + self.spec["dense"]}, "input rows")
        return df, None

    def encode(self, df: pd.DataFrame) -> tuple[torch.Tensor, ...]:
        cols = []
        for c, size in zip(self.spec["categorical"], self.spec["vocab_sizes"]):
            x = _numeric(df[c], c).to_numpy(np.float64)
            if np.isnan(x).any() or (x != np.round(x)).any() or (x < 0).any() or (x >= size).any():
                raise DataError(f"Column {c!r} must hold whole-number ids from 0 to {size - 1}.",
                                "A generated log has no fallback row for other ids.")
            cols.append(x.astype(np.int64))
        out = (torch.as_tensor(np.stack(cols, 1) if cols else np.zeros((len(df), 0), np.int64)),)
        if self.spec["dense"]:
            dense = np.stack([_numeric(df[c], c).to_numpy(np.float64) for c in self.spec["dense"]], 1)
            if np.isnan(dense).any():
                raise DataError("The dense columns of the input rows have empty values.")
            out += (torch.as_tensor(dense.astype(np.float32)),)
        return out
