"""Pruning that delivers: real bytes and real milliseconds, on real data.

    python benchmarks/pruning.py            # Fashion-MNIST CNN, banking77 MiniLM, CTR models

Writes benchmarks/results/pruning-<task>.md (joined into BENCHMARKS.md by benchmarks/assemble.py).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from common import run_section
from slimcart.report.markdown import primary_metric
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
    ("ctr", "womens-reviews", ["ctr/mlp50-ft", "ctr/nm24-ft", "ctr/prune-threshold"], "mlp-nm-threshold"),
]


def stage_notes(res) -> list[str]:
    notes = []
    for v in res.result.variants:
        for st in v.stages:
            s = st["stats"]
            keys = [k for k in ("sparsity", "param_reduction", "mac_reduction", "macs_before", "macs_after",
                                "params_before", "params_after") if k in s]
            if keys:
                notes.append(f"- {v.name} / {st['technique']}: " + ", ".join(
                    f"{k} {s[k]:.4g}" if isinstance(s[k], float) else f"{k} {s[k]}" for k in keys))
    return notes


def reference_notes(res) -> list[str]:
    """slimcart's structured variants against Torch-Pruning's own pruner at the same MACs."""
    r = res.result
    metric = primary_metric(r)
    base = r.baseline.metrics[metric]
    macs = {v.name: v.stages[0]["stats"].get("macs_after") for v in r.variants if v.stages}
    lines = []
    for ours in r.variants:
        if not ours.stages or ours.stages[0]["technique"] != "channel_prune":
            continue
        refs = [v for v in r.variants if v.stages and v.stages[0]["technique"] == "tp_magnitude_pruner"
                and macs[v.name] == macs[ours.name]]
        if refs:
            lines.append(f"- At the same MACs ({macs[ours.name]:,}): {ours.name} {metric} "
                         f"{(ours.metrics[metric] - base) * 100:+.2f} points; " + "; ".join(
                             f"{v.name} (Torch-Pruning MagnitudePruner) {(v.metrics[metric] - base) * 100:+.2f}"
                             for v in refs) + ".")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", default="benchmarks/results", type=Path,
                    help="one file per task is written here: pruning-<task>.md")
    ap.add_argument("--runs", default="runs/bench", type=Path)
    ap.add_argument("--only", default=None, help="a task name to run alone (its file alone is rewritten)")
    args = ap.parse_args()
    for task, dataset, recipes, title in CASES:
        if args.only and task != args.only:
            continue
        text, res = run_section(task, dataset, recipes, args.runs, title)
        notes, refs = stage_notes(res), reference_notes(res)
        text += ("\nWhat the stages did:\n\n" + "\n".join(notes) + "\n" if notes else "")
        text += ("\nAgainst Torch-Pruning's own pruner:\n\n" + "\n".join(refs) + "\n" if refs else "")
        out = args.results / f"pruning-{task}.md"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
