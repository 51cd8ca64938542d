"""Peak memory of a process that loads a saved model and serves one batch size, measured in
a fresh subprocess (ru_maxrss), so that one variant's allocations don't hide another's."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def peak_rss_mb(artifact: Path, runtime: str, batch: int, threads: int, onnx_path: Path | None = None,
                timeout: float = 300) -> dict[str, float] | None:
    cmd = [sys.executable, "-m", "slimcart.measure.memory_probe", str(artifact), runtime, str(batch),
           str(threads), str(onnx_path or "")]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None
    if proc.returncode != 0:
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])
