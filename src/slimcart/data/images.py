"""Image datasets: idx files (Fashion-MNIST) and a folder tree with one folder per class."""
from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np

from ..errors import DataError

FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
                         "Shirt", "Sneaker", "Bag", "Ankle boot"]
FASHION_MNIST_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}
_IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_GRAY_MODES = {"L", "1"}
_SNIFF_FILES = 50
_LAYOUT = ("Expected ROOT/train/CLASS/*.png (and ROOT/test/CLASS/... or ROOT/val/CLASS/...), "
           "one folder per class holding its image files.")


def read_idx(path: Path) -> np.ndarray:
    """Read an idx file (plain or gzip-compressed) into an array of its stored shape."""
    path = Path(path)
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except FileNotFoundError:
        raise DataError(f"idx file {path} does not exist.", "Check the path.") from None
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"Cannot read idx file {path}: {exc}.",
                        "The file is damaged or incomplete; download it again.") from None
    if len(raw) < 4 or raw[:2] != b"\x00\x00" or raw[2] not in _IDX_TYPES or raw[3] == 0:
        raise DataError(f"{path} is not an idx file (wrong magic number {raw[:4].hex()}).",
                        "Give an idx file such as train-images-idx3-ubyte(.gz).")
    dtype, ndim = np.dtype(_IDX_TYPES[raw[2]]), raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"idx file {path} is truncated (header cut short).",
                        "Download the file again.")
    dims = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    expected = header + int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(raw) != expected:
        what = "truncated" if len(raw) < expected else "longer than its header says"
        raise DataError(f"idx file {path} is {what}: {len(raw)} bytes, expected {expected} "
                        f"for shape {dims}.", "Download the file again.")
    data = np.frombuffer(raw, dtype, offset=header).reshape(dims)
    return data.astype(dtype.newbyteorder("="))


def load_fashion_mnist(folder: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train uint8 [N,28,28], y_train int64 [N], x_test, y_test) from the four idx files."""
    folder = Path(folder)
    found, missing = {}, []
    for key, name in FASHION_MNIST_FILES.items():
        path = next((folder / n for n in (name, name + ".gz") if (folder / n).is_file()), None)
        if path is None:
            missing.append(f"{name}(.gz)")
        found[key] = path
    if missing:
        raise DataError(f"Fashion-MNIST folder {folder} lacks: {', '.join(missing)}.",
                        "Put the four idx files (plain or .gz) of Fashion-MNIST in that folder.")
    arrays = {key: read_idx(path) for key, path in found.items()}
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        xp, yp = found[f"x_{split}"], found[f"y_{split}"]
        if x.ndim != 3 or x.shape[1:] != (28, 28) or x.dtype != np.uint8:
            raise DataError(f"{xp} holds {x.dtype} {x.shape}, expected uint8 images [N, 28, 28].",
                            "Check that the images and labels files are not swapped.")
        if y.ndim != 1 or len(y) != len(x):
            raise DataError(f"{yp} holds shape {y.shape}, expected {len(x)} labels "
                            f"to match {xp.name}.", "Use the labels file of the same split.")
        if len(y) and (y.min() < 0 or y.max() >= len(FASHION_MNIST_CLASSES)):
            raise DataError(f"{yp} has labels outside 0..9.", "Use the Fashion-MNIST labels file.")
    return (arrays["x_train"], arrays["y_train"].astype(np.int64),
            arrays["x_test"], arrays["y_test"].astype(np.int64))


def normalise(pixels, mean, std):
    """uint8 pixels [N, C, H, W] (any memory layout) -> float32 ((x / 255) - mean) / std, with
    ``mean`` and ``std`` one number or one per channel. Tasks and serving both call this."""
    import torch

    if isinstance(mean, (list, tuple)):
        mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    if isinstance(std, (list, tuple)):
        std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return ((pixels.float() / 255.0) - mean) / std


def _visible(path: Path) -> bool:
    return not path.name.startswith(".")


def _class_files(split_dir: Path) -> dict[str, list[Path]]:
    classes = {}
    for d in sorted(p for p in split_dir.iterdir() if p.is_dir() and _visible(p)):
        classes[d.name] = sorted(
            f for f in d.rglob("*")
            if f.is_file() and not any(p.startswith(".") for p in f.relative_to(d).parts))
    return classes


def _open(path: Path, mode: str | None, size: int):
    from PIL import Image

    try:
        with Image.open(path) as img:
            img.load()
            if mode is None:
                return img.mode
            img = img.convert(mode).resize((size, size), Image.Resampling.BILINEAR)
            return np.asarray(img, dtype=np.uint8)
    except Exception as exc:  # PIL raises many types for a file it cannot decode
        raise DataError(f"{path} is not a readable image ({type(exc).__name__}: {exc}).",
                        "Remove that file from the dataset folder, or replace it with a "
                        "valid image.") from None


def load_image_folder(root: Path, image_size: int = 32, grayscale: bool | None = None
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """(x_train, y_train, x_test, y_test, classes) from ROOT/{train,test|val}/CLASS/*.

    Images are uint8 [N, H, W, C] (C=1 for grayscale, 3 for RGB), labels int64 indices
    into the sorted class names of train/."""
    root = Path(root)
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise DataError(f"image_size={image_size!r} is not a positive integer.",
                        "Pass the side length in pixels, e.g. image_size=32.")
    if not root.is_dir():
        raise DataError(f"Image folder {root} does not exist.", _LAYOUT)
    train_dir = root / "train"
    if not train_dir.is_dir():
        raise DataError(f"Image folder {root} has no train/ folder.", _LAYOUT)
    test_dir = next((root / n for n in ("test", "val") if (root / n).is_dir()), None)
    if test_dir is None:
        raise DataError(f"Image folder {root} has neither test/ nor val/.", _LAYOUT)
    train = _class_files(train_dir)
    if not train:
        raise DataError(f"{train_dir} has no class folders.", _LAYOUT)
    empty = [c for c, files in train.items() if not files]
    if empty:
        raise DataError(f"Class folder(s) {', '.join(empty)} in {train_dir} hold no files.",
                        "Add images to them or remove them. " + _LAYOUT)
    test = _class_files(test_dir)
    unknown = sorted(set(test) - set(train))
    if unknown:
        raise DataError(f"{test_dir} has class folder(s) {', '.join(unknown)} that "
                        f"{train_dir} lacks.", "Use the same class folders in both splits.")
    if not any(test.values()):
        raise DataError(f"{test_dir} holds no images.", _LAYOUT)
    classes = sorted(train)
    if grayscale is None:
        first = [f for c in classes for f in train[c]][:_SNIFF_FILES]
        grayscale = all(_open(f, None, image_size) in _GRAY_MODES for f in first)
    mode = "L" if grayscale else "RGB"
    out = []
    for split in (train, test):
        files = [(f, i) for i, c in enumerate(classes) for f in split.get(c, [])]
        x = np.empty((len(files), image_size, image_size, 1 if grayscale else 3), np.uint8)
        for n, (f, _) in enumerate(files):
            x[n] = _open(f, mode, image_size).reshape(x.shape[1:])
        out += [x, np.array([i for _, i in files], dtype=np.int64)]
    return out[0], out[1], out[2], out[3], classes
