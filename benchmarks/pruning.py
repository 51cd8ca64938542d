"""Pruning that delivers: real bytes and real milliseconds, on real data.

    python benchmarks/pruning.py            # Fashion-MNIST CNN, banking77 MiniLM, CTR models

Writes benchmarks/results/pruning.md (joined into BENCHMARKS.md by benchmarks/assemble.py).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from common import run_section
from tp_reference import recipe as tp_recipe

IMAGE_MEASURE = {"batch_sizes": [1, 64], "runtimes": ["torch", "onnxruntime"]}
CASES = [
    # Torch-Pruning's own MagnitudePruner at the same ratio as channel60-ft (so the same MACs), once
    # alone and once with the same fine-tuning budget, measured in the same process.
    ("product_image", "fashion-mnist", ["product_image/channel50-ft", "product_image/channel60-ft",
                                        tp_recipe("tp-magnitude60-ft", 0.6, 3.0, IMAGE_MEASURE, round_to=4),
                                        tp_recipe("tp-magnitude60", 0.6, 0.0, IMAGE_MEASURE, round_to=4),
                                        "product_image/gradual90", "product_image/prune50-global"],
     "structured-and-gradual"),
    ("intent", "banking77", ["intent/heads50-ft"], "heads-ffn"),
    ("ctr", "womens-reviews", ["ctr/nm24-ft", "ctr/prune-threshold"], "nm-and-threshold"),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results/pruning.md")
    ap.add_argument("--runs", default="runs/bench", type=Path)
    ap.add_argument("--only", default=None, help="a task name to run alone")
    args = ap.parse_args()
    sections = []
    for task, dataset, recipes, title in CASES:
        if args.only and task != args.only:
            continue
        text, res = run_section(task, dataset, recipes, args.runs, title)
        notes = []
        for v in res.result.variants:
            for st in v.stages:
                s = st["stats"]
                keys = [k for k in ("sparsity", "param_reduction", "mac_reduction", "macs_before", "macs_after",
                                    "params_before", "params_after") if k in s]
                if keys:
                    notes.append(f"- {v.name} / {st['technique']}: " + ", ".join(
                        f"{k} {s[k]:.4g}" if isinstance(s[k], float) else f"{k} {s[k]}" for k in keys))
        sections.append(text + ("\nWhat the stages did:\n\n" + "\n".join(notes) + "\n" if notes else ""))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("## Pruning: structured, gradual, N:M\n\n" + "\n".join(sections))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
