"""Run as a subprocess: load an artifact, serve a batch a few times, print peak RSS (MB)."""
from __future__ import annotations

import json
import sys
from pathlib import Path


def _status_mb(field: str) -> float:
    """VmRSS / VmHWM of this process in MB. VmHWM belongs to this process image alone (unlike
    ru_maxrss, which a child inherits from the parent that forked it)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def main() -> None:
    folder, runtime, batch, threads, onnx_path = sys.argv[1:6]
    import torch

    from .. import artifact
    from .runtimes import OrtRunner, TorchRunner, set_threads

    set_threads(int(threads))
    examples = artifact.load_examples(folder)
    idx = torch.arange(int(batch)) % examples[0].shape[0]
    inputs = tuple(t[idx] for t in examples)
    before = _status_mb("VmRSS")
    names = tuple(artifact.read_meta(folder)["inputs"])
    if runtime == "torch":
        run = TorchRunner(artifact.load(folder).torch_model)
    else:
        path = Path(onnx_path) if onnx_path else artifact.load(folder).onnx_path
        run = OrtRunner(path, names, int(threads))
    for _ in range(3):
        run(inputs)
    peak = _status_mb("VmHWM")
    print(json.dumps({"peak_rss_mb": round(peak, 1), "runtime_start_mb": round(before, 1),
                      "model_and_run_mb": round(peak - before, 1)}))


if __name__ == "__main__":
    main()
