"""`slimcart bench`: one saved model measured alone, on the real input batch stored with it, in
every runtime that can serve it (the runtime's own artifact: the folder's model, or the
``served/<runtime>/`` artifact that `compress` saved beside it, or a conversion made for this run).
Setup time is shown apart from latency: building the runner, and its first call per batch size
(for torch.compile, the compile); the warm-up calls make it before any timed call."""
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
    """One row per runtime label and batch size. ``runtimes``: names, mappings or
    ``NAME:key=value,...`` strings (see slimcart.measure.runtimes.parse_choice)."""
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
    runners, sizes, where, by_family = {}, {}, {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for choice in [parse_choice(r) for r in (runtimes or ["torch", "onnxruntime"])]:
            family = choice.runtime.family   # one conversion per family (ONNX Runtime and OpenVINO share it)
            if family not in by_family:
                by_family[family] = formats.served_state(folder, state, family, Path(tmp))
            got = by_family[family]
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
    notes = {rt: "; ".join(getattr(fn, "notes", [])) for rt, fn in runners.items()}
    rows = []
    for (rt, b), t in timings.items():
        s, fn = t.summary(), runners[rt]
        first = fn.first_call_s(cases[(rt, b)][1]) if hasattr(fn, "first_call_s") else None
        build = getattr(fn, "build_s", None)
        rows.append({"runtime": rt, "batch": b, "p50 ms": f"{s['p50']:.3f}",
                     "p50 95% CI": f"[{s['p50_low']:.3f}, {s['p50_high']:.3f}]", "p95 ms": f"{s['p95']:.3f}",
                     "p99 ms": f"{s['p99']:.3f}", "samples/s": f"{rates[(rt, b)]:.1f}",
                     "build s": "-" if build is None else f"{build:.3f}",
                     "first call s": "-" if first is None else f"{first:.3f}",
                     "size MB": f"{sizes[rt] / 1e6:.3f}", "artifact": where[rt], "threads": threads,
                     **({"notes": notes[rt]} if any(notes.values()) else {})})
    return rows
