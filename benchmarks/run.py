"""Regenerate the main table of BENCHMARKS.md: every task on its real datasets, baseline vs each
shipped quantization/export recipe, measured in one process per task (interleaved timing).

    python benchmarks/run.py                       # all tasks (about 25 min on 2 cores)
    python benchmarks/run.py --only ctr            # one task

Writes benchmarks/results/main.md; benchmarks/assemble.py joins the result files into BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from common import run_section

CASES = [
    # bitext is the e-commerce demo (a fine-tuned MiniLM makes ~3 errors in 450 there); accuracy
    # differences between variants are measured on banking77
    ("intent", "banking77", ["intent/int8-dynamic", "intent/onnx-int8", "intent/prune30-onnx"]),
    ("product_image", "fashion-mnist", ["product_image/onnx", "product_image/static-int8",
                                        "product_image/prune50-global"]),
    ("ctr", "womens-reviews", ["ctr/int8-dynamic", "ctr/onnx-int8", "ctr/prune-threshold"]),
    ("ctr", "online-shoppers", ["ctr/int8-dynamic", "ctr/onnx-int8", "ctr/prune-threshold"]),
    ("ctr", "synthetic:rows=200000,fields=8,vocab=100000", ["ctr/int8-dynamic", "ctr/onnx-int8",
                                                            "ctr/prune-threshold"]),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results/main.md")
    ap.add_argument("--runs", default="runs/bench", type=Path)
    ap.add_argument("--only", default=None, help="a task name to run alone")
    args = ap.parse_args()
    sections = [run_section(t, d, r, args.runs)[0] for t, d, r in CASES if not args.only or t == args.only]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("## Quantization and export: baseline vs each shipped recipe\n\n" + "\n".join(sections))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
