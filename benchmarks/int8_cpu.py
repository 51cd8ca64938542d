"""Static INT8 with 7-bit and 8-bit weights, and bfloat16, on whatever CPU this runs on: the check
that the int8 scheme slimcart picks per CPU (quantize/int8_features.py) is the right one there.

On CPUs without VNNI, U8S8 products saturate 16-bit sums, so 8-bit weights lose accuracy and
slimcart picks 7 bits; on VNNI/AMX CPUs both should keep it. The ONNX files are the
product_image artifacts of benchmarks/static_int8.py, copied with the test set by `gpu.py prepare`:

    python benchmarks/gpu.py prepare .gpu
    mkdir -p .gpu/onnx && cp runs/bench/product_image-fashion-mnist-static-int8/variants/{onnx,static-minmax-7bit,static-minmax-8bit}/model.onnx ...
    python benchmarks/int8_cpu.py .gpu --out benchmarks/results/int8_cpu.md

Each variant is scored on the full test set and timed interleaved (ONNX Runtime without spinning,
PyTorch eager) at batch 1 and 64, against float32 eager PyTorch in the same run.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from gpu import load, metric
from slimcart.measure import hardware
from slimcart.measure.latency import interleaved
from slimcart.measure.runners import OrtRunner, TorchRunner
from slimcart.measure.stats import fmt_speedup, speedup
from slimcart.quantize.int8_features import detect


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", type=Path)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "int8_cpu.md")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=30)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    model, inputs, labels, meta = load(a.folder / "product_image")
    runners = {"eager float32": TorchRunner(model, threads=a.threads)}
    for dtype, flags in (("bfloat16", hardware.BF16_FEATURES), ("float16", hardware.FP16_FEATURES)):
        if hardware.has_cpu_feature(*flags):
            runners[f"eager {dtype}"] = TorchRunner(model, dtype=dtype, threads=a.threads)
    for f in sorted((a.folder / "onnx").glob("*.onnx")):
        runners[f"onnxruntime {f.stem}"] = OrtRunner(f, ("pixels",), threads=a.threads)
    scores = {}
    for k, r in runners.items():
        out = np.concatenate([r((inputs[0][i:i + 256],)) for i in range(0, len(labels), 256)])
        scores[k] = metric("product_image", out, labels)
    features, scheme = detect()
    lines = ["## Static INT8 (7-bit and 8-bit weights) and bfloat16 on this CPU", "",
             f"{hardware.summary()}", "",
             f"Int8 features: {', '.join(features) or 'none'}. slimcart's int8 scheme here: {scheme.level}, "
             f"reduce_range={scheme.reduce_range} ({scheme.reason}).",
             f"{a.threads} threads; {a.rounds} rounds x 3 calls, interleaved; speedups against eager float32 "
             "PyTorch with a paired 95% bootstrap interval. Metric: the full test set "
             f"(CPU float32 in `prepare`: {meta['cpu_float32_metric']}).", "",
             "| variant | metric |", "|---|---|"] + [f"| {k} | {v} |" for k, v in scores.items()]
    lines += ["", "| batch | variant | p50 ms | speedup vs eager float32 |", "|---|---|---|---|"]
    for b in (1, 64):
        x = (inputs[0][:b],)
        tm = interleaved({k: (r, x, b) for k, r in runners.items()}, rounds=a.rounds, warmup=5, progress=False)
        for k in runners:
            sp = "1.00x (baseline)" if k == "eager float32" else fmt_speedup(speedup(tm["eager float32"], tm[k]))
            lines.append(f"| {b} | {k} | {tm[k].summary()['p50']:.3f} | {sp} |")
    a.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
