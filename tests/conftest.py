"""Shared fixtures. Tests use the real data in ../shared/data when it is there (CI), else the
data shipped in the package; Fashion-MNIST also comes from Debian's dataset-fashion-mnist."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data"
if "SLIMCART_DATA_DIR" not in os.environ and SHARED.is_dir():
    os.environ["SLIMCART_DATA_DIR"] = str(SHARED)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(2)


def have_fashion_mnist() -> bool:
    from slimcart.data import paths

    try:
        paths.find(["images/fashion-mnist"], "fashion-mnist")
        return True
    except Exception:
        return False


@pytest.fixture(scope="session")
def ctr_task():
    import slimcart as sc

    return sc.load_task("ctr", "womens-reviews")


@pytest.fixture(scope="session")
def ctr_model(ctr_task):
    return ctr_task.train_baseline("full", progress=False)


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the real `slimcart` command in a subprocess."""
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-m", "slimcart", *args], capture_output=True, text=True,
                          cwd=cwd, env=full_env, timeout=900)
