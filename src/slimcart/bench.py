"""`slimcart bench`: one saved model measured alone, on the real input batch stored with it, in
every runtime that can serve it (the runtime's own artifact: the folder's model, or the
``served/<runtime>/`` artifact that `compress` saved beside it, or a conversion made for this run)."""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from . import artifact, formats
from .errors import ModelError
from .measure.latency import interleaved, sustained_throughput
from .measure.runtimes import parse_choice, set_threads


def bench_artifact(folder: Path, batch_sizes: list[int], rounds: int = 30,
                   threads: int | None = None, runtimes: list | None = None) -> list[dict]:
    folder = Path(folder)
    threads = set_threads(threads)
    meta = artifact.read_meta(folder)
    names = tuple(meta["inputs"])
    state = artifact.load(folder)
    try:
        examples = artifact.load_examples(folder)
    except Exception as exc:  # safetensors raises its own error types for damaged files
        raise ModelError(f"Cannot read the example batch {folder / artifact.EXAMPLES}: {exc}",
                         "The folder is damaged; save the model again.") from None
    runners, sizes, where = {}, {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for choice in [parse_choice(r) for r in (runtimes or ["torch", "onnxruntime"])]:
            got = formats.served_state(folder, state, choice.runtime.family, Path(tmp))
            if got is None:
                continue
            served, sizes[choice.label], where[choice.label] = got
            runners[choice.label] = choice.runner(served, names, threads)
        cases = {}
        for rt, fn in runners.items():
            for b in batch_sizes:
                idx = torch.arange(b) % examples[0].shape[0]
                cases[(rt, b)] = (fn, tuple(t[idx].contiguous() for t in examples), b)
        timings = interleaved(cases, rounds, warmup=3, progress=False)
        rates = {k: sustained_throughput(fn, x, b, 0.5)["samples_per_s"] for k, (fn, x, b) in cases.items()}
    rows = []
    for (rt, b), t in timings.items():
        s = t.summary()
        rows.append({"runtime": rt, "batch": b, "p50 ms": f"{s['p50']:.3f}",
                     "p50 95% CI": f"[{s['p50_low']:.3f}, {s['p50_high']:.3f}]", "p95 ms": f"{s['p95']:.3f}",
                     "p99 ms": f"{s['p99']:.3f}", "samples/s": f"{rates[(rt, b)]:.1f}",
                     "size MB": f"{sizes[rt] / 1e6:.3f}", "artifact": where[rt], "threads": threads})
    return rows
