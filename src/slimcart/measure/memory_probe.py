"""Run as a subprocess: load an artifact, serve a batch a few times, print memory in MB as JSON.

``process_start_mb``: resident memory when ``main`` starts. ``runtime_start_mb``: once the
runtime libraries (torch; onnxruntime for an ONNX Runtime runtime) and the probe's own code are
imported, before the model. ``model_and_run_mb`` = peak - runtime_start_mb: what loading the
model and serving the batch added, with no library counted as model memory. The slimcart
package imports its API lazily, so ``python -m slimcart.measure.memory_probe`` starts with
little more than the interpreter in memory."""
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
    process_start = _status_mb("VmRSS")
    folder, runtime, batch, threads, onnx_path = sys.argv[1:6]
    ort = runtime.startswith("onnxruntime")
    if runtime != "torch" and not ort:
        sys.exit(f"unknown runtime {runtime!r}: expected 'torch' or 'onnxruntime...'")
    import torch

    if ort:
        import onnxruntime  # noqa: F401

    from slimcart import artifact
    from slimcart.measure.runtimes import OrtRunner, TorchRunner, set_threads

    runtime_start = _status_mb("VmRSS")
    set_threads(int(threads))
    examples = artifact.load_examples(folder)
    idx = torch.arange(int(batch)) % examples[0].shape[0]
    inputs = tuple(t[idx] for t in examples)
    names = tuple(artifact.read_meta(folder)["inputs"])
    if ort:
        path = Path(onnx_path) if onnx_path else artifact.load(folder).onnx_path
        run = OrtRunner(path, names, int(threads))
    else:
        run = TorchRunner(artifact.load(folder).torch_model)
    for _ in range(3):
        run(inputs)
    peak = _status_mb("VmHWM")
    print(json.dumps({"peak_rss_mb": round(peak, 1), "process_start_mb": round(process_start, 1),
                      "runtime_start_mb": round(runtime_start, 1),
                      "model_and_run_mb": round(peak - runtime_start, 1)}))


if __name__ == "__main__":
    main()
