"""Peak memory of a process that loads a saved model and serves one batch size, measured in
a fresh subprocess (ru_maxrss), so that one variant's allocations don't hide another's."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

_last_error: str | None = None


def last_error() -> str | None:
    """Why the latest ``peak_rss_mb`` call returned None (last line of the probe's stderr), or None."""
    return _last_error


def peak_rss_mb(artifact: Path, runtime: str, batch: int, threads: int, onnx_path: Path | None = None,
                timeout: float = 300) -> dict[str, float] | None:
    global _last_error
    cmd = [sys.executable, "-m", "slimcart.measure.memory_probe", str(artifact), runtime, str(batch),
           str(threads), str(onnx_path or "")]
    _last_error = None
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        _last_error = f"memory probe timed out after {timeout:g} s"
        return None
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()
        _last_error = tail[-1] if tail else f"memory probe exited with code {proc.returncode}"
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])
