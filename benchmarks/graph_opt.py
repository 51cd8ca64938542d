"""Graph optimisation: BatchNorm folding, ONNX Runtime's offline graph optimisation and its
transformer fusions, on the trained baselines (Fashion-MNIST CNN, banking77 MiniLM).

    python benchmarks/graph_opt.py                 # both tasks
    python benchmarks/graph_opt.py --only intent   # one task
    python benchmarks/graph_opt.py --quick         # smoke run: minimal rounds, 512 scored rows

Writes benchmarks/results/graph_opt.md (joined into BENCHMARKS.md by benchmarks/assemble.py):
speedups with their intervals from the interleaved timing, and each stage's parity with eager.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from common import run_section
from slimcart.accelerate.fold import FoldBnConfig
from slimcart.accelerate.onnx_export import OnnxExportConfig
from slimcart.accelerate.ort_optimize import OrtOptimizeConfig
from slimcart.prune.structured import ChannelPruneConfig
from slimcart.recipe import MeasureConfig, Recipe

IMAGE = {"batch_sizes": [1, 64], "runtimes": ["torch", "onnxruntime"]}
TEXT = {"batch_sizes": [1, 32], "runtimes": ["torch", "onnxruntime"]}


def _inline(name: str, stages: list, measure: dict, description: str) -> Recipe:
    return Recipe(stages, MeasureConfig(**measure), name=name, description=description)


CASES = [
    # fold_bn is an eager-PyTorch gain: the ONNX exporter folds BatchNorm itself. ort_optimize's
    # graph is what ONNX Runtime builds at session start anyway (the runtime uses level all).
    ("product_image", "fashion-mnist", IMAGE, lambda: [
        "product_image/fold-bn",
        # composition: pruned without fine-tuning (accuracy falls; compare these two rows for speed)
        _inline("channel50", [ChannelPruneConfig(ratio=0.5)], IMAGE, "channel_prune 50%, no fine-tuning"),
        _inline("channel50-fold", [ChannelPruneConfig(ratio=0.5), FoldBnConfig()], IMAGE,
                "channel_prune 50%, no fine-tuning, then fold_bn"),
        "product_image/onnx",
        _inline("onnx-ort-all", [OnnxExportConfig(), OrtOptimizeConfig(level="all")], IMAGE,
                "export, then ONNX Runtime level 'all' applied offline"),
    ]),
    ("intent", "banking77", TEXT, lambda: [
        "intent/onnx-int8",
        "intent/onnx-fused",
        "intent/onnx-fused-int8",
        _inline("onnx-ort-extended", [OnnxExportConfig(), OrtOptimizeConfig(level="extended")], TEXT,
                "export, then ONNX Runtime level 'extended' applied offline (its own fusions, no Python fuser)"),
    ]),
]

KEYS = ("pairs_folded", "relu_inplace", "level", "nodes_before", "nodes_after", "fused_operators",
        "reexported", "parity_reference", "max_abs_error", "max_rel_error", "max_abs_error_vs_eager")


def stage_notes(res) -> list[str]:
    """What each graph stage did and how far its outputs are from the reference."""
    lines = []
    for v in res.result.variants:
        for st in v.stages:
            s = st["stats"]
            got = [f"{k} {s[k]:.3g}" if isinstance(s[k], float) else f"{k} {s[k]}" for k in KEYS if k in s]
            if st["technique"] == "ort_int8_dynamic":
                ops = {k: n for k, n in s.get("ops_after", {}).items() if "Integer" in k or k[0] == "Q"}
                got = [f"int8 ops {ops}"]
            got += st.get("notes", [])
            if got:
                lines.append(f"- {v.name} / {st['technique']}: " + "; ".join(got))
    return lines


def roofline(task_name: str, dataset: str, res, batch: int) -> str:
    """The model's FLOPs at the timed batch (PyTorch's FlopCounterMode) over the measured p50s,
    against the fp32 GEMM rate this CPU reaches on the model's largest matmul shape."""
    import time

    import numpy as np
    import torch
    from common import baseline
    from torch.utils.flop_counter import FlopCounterMode

    import slimcart as sc

    task = sc.load_task(task_name, dataset)
    model = baseline(task).eval()
    x = task.example_inputs(batch, "val")
    with torch.inference_mode(), FlopCounterMode(display=False) as fc:
        model(*x)
    flops = fc.get_total_flops()
    tokens = int(x[0].numel())
    a, b = torch.randn(tokens, 384), torch.randn(384, 1536)
    times = []
    with torch.inference_mode():
        for _ in range(20):
            t0 = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - t0)
    gemm = 2 * tokens * 384 * 1536 / float(np.median(times[5:])) / 1e9
    base = res.result.baseline.latency_ms
    rates = {rt: flops / (base[rt][str(batch)].p50 / 1e3) / 1e9 for rt in base if str(batch) in base[rt]}
    return (f"Roofline at batch {batch} ({tokens} padded tokens): the model does {flops / 1e9:.1f} GFLOP "
            f"per call (PyTorch's FlopCounterMode); a ({tokens}x384)·(384x1536) fp32 matmul, its largest "
            f"GEMM, runs at {gemm:.0f} GFLOP/s here; the baseline reaches "
            + ", ".join(f"{v:.0f} GFLOP/s in {rt}" for rt, v in rates.items())
            + f" ({max(rates.values()) / gemm:.0%} of that GEMM rate). At this batch the fp32 model is "
            "bound by its matrix multiplications, so fusing the memory-bound operators (LayerNorm, GELU, "
            "softmax) cannot make it measurably faster; int8 GEMMs (onnx-int8 rows) or less work "
            "(fewer layers, heads or padded tokens) can.\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results/graph_opt.md", type=Path)
    ap.add_argument("--runs", default="runs/bench", type=Path)
    ap.add_argument("--only", default=None, help="a task name to run alone (the file then holds it alone)")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: 30 rounds x 1 call, 512 scored rows, no deployed/throughput/memory")
    args = ap.parse_args()
    sections = []
    for task, dataset, measure, recipes in CASES:
        if args.only and task != args.only:
            continue
        quick = dict(rounds=30, calls_per_block=1, eval_limit=512, deployed=False, throughput_seconds=0,
                     memory=False) if args.quick else {}
        text, res = run_section(task, dataset, recipes(), args.runs, "graph-opt",
                                measure=MeasureConfig(**measure, **quick))
        notes = stage_notes(res)
        if task == "intent":
            text += "\n" + roofline(task, dataset, res, max(measure["batch_sizes"]))
        sections.append(text + ("\nWhat the stages did (parity against the reference each names):\n\n"
                                + "\n".join(notes) + "\n" if notes else ""))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("## Graph optimisation: BatchNorm folding, ONNX Runtime graph optimisation and "
                        "transformer fusions\n\n" + ("_Smoke run (--quick): timings are not meaningful._\n\n"
                                                     if args.quick else "") + "\n".join(sections))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
