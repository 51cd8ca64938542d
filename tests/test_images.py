import gzip
import os
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from slimcart.data.images import (FASHION_MNIST_CLASSES, load_fashion_mnist,
                                  load_image_folder, read_idx)
from slimcart.errors import DataError


def _idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def _save(path: Path, size, mode="RGB", color=(200, 10, 10)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color if mode == "RGB" else 128).save(path)


def _tree(root: Path):
    _save(root / "train" / "shoe" / "a.png", (40, 30))
    _save(root / "train" / "shoe" / "b.png", (10, 12), color=(0, 0, 255))
    _save(root / "train" / "bag" / "c.png", (64, 64))
    _save(root / "train" / "bag" / "d.jpg", (20, 50))
    _save(root / "test" / "bag" / "e.png", (33, 33))
    _save(root / "test" / "shoe" / "f.png", (8, 8))
    (root / "train" / "bag" / ".DS_Store").write_bytes(b"\x00junk")
    (root / "train" / ".hidden").mkdir()


def test_idx_round_trip_plain_and_gz(tmp_path):
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    (tmp_path / "plain-idx3-ubyte").write_bytes(_idx_bytes(array))
    (tmp_path / "zipped-idx3-ubyte.gz").write_bytes(gzip.compress(_idx_bytes(array)))
    for name in ("plain-idx3-ubyte", "zipped-idx3-ubyte.gz"):
        out = read_idx(tmp_path / name)
        assert out.dtype == np.uint8 and np.array_equal(out, array)
    labels = np.array([3, 1, 4, 1, 5], dtype=np.uint8)
    (tmp_path / "labels").write_bytes(_idx_bytes(labels))
    assert read_idx(tmp_path / "labels").tolist() == [3, 1, 4, 1, 5]


def test_idx_errors(tmp_path):
    good = _idx_bytes(np.zeros((2, 5, 5), np.uint8))
    (tmp_path / "short").write_bytes(good[:-3])
    (tmp_path / "magic").write_bytes(b"\x12\x34" + good[2:])
    (tmp_path / "broken.gz").write_bytes(gzip.compress(good)[:20])
    with pytest.raises(DataError, match="short is truncated"):
        read_idx(tmp_path / "short")
    with pytest.raises(DataError, match="magic is not an idx file"):
        read_idx(tmp_path / "magic")
    with pytest.raises(DataError, match="broken.gz"):
        read_idx(tmp_path / "broken.gz")
    with pytest.raises(DataError, match="does not exist"):
        read_idx(tmp_path / "nothing")


def test_fashion_mnist_missing_files(tmp_path):
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(b"")
    with pytest.raises(DataError, match="lacks: train-labels-idx1-ubyte.*t10k-images") as info:
        load_fashion_mnist(tmp_path)
    assert "train-images" not in info.value.message and str(tmp_path) in info.value.message


def test_fashion_mnist_small_fake(tmp_path):
    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("t10k", 4)):
        x = rng.integers(0, 256, (n, 28, 28)).astype(np.uint8)
        (tmp_path / f"{split}-images-idx3-ubyte.gz").write_bytes(gzip.compress(_idx_bytes(x)))
        (tmp_path / f"{split}-labels-idx1-ubyte").write_bytes(_idx_bytes(np.arange(n) % 10))
    x_train, y_train, x_test, y_test = load_fashion_mnist(tmp_path)
    assert x_train.shape == (6, 28, 28) and x_test.shape == (4, 28, 28)
    assert y_train.dtype == np.int64 and y_test.tolist() == [0, 1, 2, 3]


def test_image_folder(tmp_path):
    _tree(tmp_path)
    x_train, y_train, x_test, y_test, classes = load_image_folder(tmp_path, image_size=16)
    assert classes == ["bag", "shoe"]
    assert x_train.shape == (4, 16, 16, 3) and x_train.dtype == np.uint8
    assert y_train.dtype == np.int64 and y_train.tolist() == [0, 0, 1, 1]
    assert x_test.shape == (2, 16, 16, 3) and y_test.tolist() == [0, 1]
    assert x_train[0, 8, 8].tolist() == [200, 10, 10]   # bag/c.png, red
    assert x_train[3, 8, 8].tolist() == [0, 0, 255]     # shoe/b.png, blue
    gray = load_image_folder(tmp_path, image_size=8, grayscale=True)
    assert gray[0].shape == (4, 8, 8, 1)


def test_image_folder_detects_grayscale_and_val(tmp_path):
    _save(tmp_path / "train" / "a" / "1.png", (5, 5), mode="L")
    _save(tmp_path / "train" / "b" / "2.png", (7, 9), mode="L")
    _save(tmp_path / "val" / "b" / "3.png", (7, 9), mode="L")
    x_train, _, x_test, y_test, classes = load_image_folder(tmp_path, image_size=4)
    assert x_train.shape == (2, 4, 4, 1) and x_test.shape == (1, 4, 4, 1)
    assert y_test.tolist() == [1] and classes == ["a", "b"]
    assert int(x_train[0, 2, 2, 0]) == 128


def test_image_folder_bad_file(tmp_path):
    _tree(tmp_path)
    (tmp_path / "train" / "shoe" / "notes.txt").write_text("not a picture")
    with pytest.raises(DataError, match="notes.txt is not a readable image") as info:
        load_image_folder(tmp_path)
    assert "Remove that file" in str(info.value)


def test_image_folder_layout_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_image_folder(tmp_path / "nowhere")
    (tmp_path / "test").mkdir()
    with pytest.raises(DataError, match="no train/ folder"):
        load_image_folder(tmp_path)
    (tmp_path / "train").mkdir()
    with pytest.raises(DataError, match="no class folders"):
        load_image_folder(tmp_path)
    (tmp_path / "train" / "shoe").mkdir()
    with pytest.raises(DataError, match="shoe .*hold no files"):
        load_image_folder(tmp_path)
    _save(tmp_path / "train" / "shoe" / "a.png", (4, 4))
    _save(tmp_path / "test" / "hat" / "b.png", (4, 4))
    with pytest.raises(DataError, match="hat"):
        load_image_folder(tmp_path)
    with pytest.raises(DataError, match="image_size"):
        load_image_folder(tmp_path, image_size=0)


def _fashion_dir():
    candidates = []
    if os.environ.get("SLIMCART_DATA_DIR"):
        candidates.append(Path(os.environ["SLIMCART_DATA_DIR"]) / "images" / "fashion-mnist")
    candidates.append(Path("/usr/share/datasets/fashion-mnist"))
    return next((p for p in candidates if p.is_dir()), None)


def test_real_fashion_mnist():
    folder = _fashion_dir()
    if folder is None:
        pytest.skip("Fashion-MNIST is not installed")
    x_train, y_train, x_test, y_test = load_fashion_mnist(folder)
    assert x_train.shape == (60000, 28, 28) and x_test.shape == (10000, 28, 28)
    assert x_train.dtype == np.uint8 and y_train.dtype == np.int64
    assert sorted(set(y_train.tolist())) == list(range(len(FASHION_MNIST_CLASSES)))
    assert np.bincount(y_test).tolist() == [1000] * 10
