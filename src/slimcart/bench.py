"""`slimcart bench`: one saved model measured alone, on the real input batch stored with it."""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from . import artifact
from .measure.latency import interleaved
from .measure.runtimes import OrtRunner, TorchRunner, set_threads
from .registry import TORCH


def bench_artifact(folder: Path, batch_sizes: list[int], rounds: int = 30,
                   threads: int | None = None) -> list[dict]:
    threads = set_threads(threads)
    meta = artifact.read_meta(folder)
    names = tuple(meta["inputs"])
    state = artifact.load(folder)
    examples = artifact.load_examples(folder)
    runners = {}
    with tempfile.TemporaryDirectory() as tmp:
        if state.torch_model is not None:
            runners["torch"] = TorchRunner(state.torch_model)
        if state.onnx_path is not None:
            runners["onnxruntime"] = OrtRunner(state.onnx_path, names, threads)
        elif state.format == TORCH:
            from .accelerate.onnx_export import export_onnx

            axes = {n: {0: "batch"} for n in names} | {"logits": {0: "batch"}}
            if "input_ids" in names:
                axes.update({n: {0: "batch", 1: "sequence"} for n in names})
            runners["onnxruntime"] = OrtRunner(export_onnx(state.torch_model, examples, Path(tmp) / "m.onnx",
                                                           names, axes), names, threads)
        cases = {}
        for rt, fn in runners.items():
            for b in batch_sizes:
                idx = torch.arange(b) % examples[0].shape[0]
                cases[(rt, b)] = (fn, tuple(t[idx].contiguous() for t in examples), b)
        timings = interleaved(cases, rounds, warmup=3, progress=False)
    size = artifact.size_bytes(folder)
    rows = []
    for (rt, b), t in timings.items():
        s = t.summary()
        rows.append({"runtime": rt, "batch": b, "p50 ms": f"{s['p50']:.3f}", "p95 ms": f"{s['p95']:.3f}",
                     "p99 ms": f"{s['p99']:.3f}", "samples/s": f"{t.throughput():.1f}",
                     "size MB": f"{size / 1e6:.3f}", "format": meta["format"], "threads": threads})
    return rows
