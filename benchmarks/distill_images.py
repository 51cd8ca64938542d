"""Distillation on real product photos (Grocery Store, 43 classes): the ImageNet-pretrained
EfficientNet-Lite0 fine-tuned at 224 px is the teacher; the student is the same network with half of
its channels removed (--width 0.48: under 1/4 of the MACs), trained from the teacher's soft targets,
next to the same student trained on the labels alone, and the stacked recipe
product_image/distill-w48-static-int8 (the distilled student, exported, static INT8); all timed in
one run against the teacher.

Needs the photos in $SLIMCART_DATA_DIR/images/grocery-store (see ../shared/data/README.md).
Writes benchmarks/results/distill_images.md. Run from the repository root."""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from common import markdown_table, run_section  # noqa: E402

from slimcart.recipe import MeasureConfig, Recipe, shipped_recipes, technique_name  # noqa: E402


STACKED = "product_image/distill-w48-static-int8"


def student_recipe(name: str, distilled: bool, width: float, epochs: float, then: list | None = None) -> Recipe:
    """The stacked recipe's distill stage at ``width`` / ``epochs`` (labels only: alpha 1), then ``then``."""
    stacked = Recipe.load(shipped_recipes()[STACKED])
    dump = lambda cfg: {"type": technique_name(cfg), **cfg.model_dump(exclude_defaults=True)}  # noqa: E731
    stage = {**dump(stacked.stages[0]), "student": {"width": width}, "epochs": epochs}
    if not distilled:
        stage["alpha"] = 1.0
    stages = [stage] + [dump(s) for s in (then or [])]
    return Recipe.from_dict({"name": name, "version": 1, "stages": stages,
                             "description": ("student: channel-pruned teacher, " +
                                             ("distilled from the teacher" if distilled else "labels only") +
                                             (", exported, static INT8" if then else ""))})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="benchmarks/results/distill_images.md", type=Path)
    ap.add_argument("--runs", default="runs/bench", type=Path)
    ap.add_argument("--width", default=0.48, type=float)
    ap.add_argument("--epochs", default=5.0, type=float)
    args = ap.parse_args()
    data = Path(os.environ.get("SLIMCART_DATA_DIR", "../shared/data")) / "images" / "grocery-store"
    if not data.is_dir():
        sys.exit(f"{data} not found: set SLIMCART_DATA_DIR to the folder holding images/grocery-store")
    t0 = time.time()
    tag = f"w{round(args.width * 100)}"
    recipes = ["product_image/onnx",
               student_recipe(f"distilled-{tag}", True, args.width, args.epochs),
               student_recipe(f"labels-only-{tag}", False, args.width, args.epochs),
               student_recipe(f"distilled-{tag}-static-int8", True, args.width, args.epochs,
                              then=Recipe.load(shipped_recipes()[STACKED]).stages[1:])]
    measure = MeasureConfig(batch_sizes=[1, 64], runtimes=["torch", "onnxruntime"], deployed=False,
                            memory=False, throughput_seconds=0)
    text, res = run_section("product_image", str(data), recipes, args.runs, "distill", measure=measure)
    r = res.result
    base, m = r.baseline, r.primary_metric
    rows = []
    for v in r.variant_rows():
        macs = next((s["stats"]["student_narrowed"] for s in v.stages if "student_narrowed" in s.get("stats", {})), None)
        row = {"Variant": v.name, "MACs vs teacher": "1.00" if macs is None else f"{macs['macs_after'] / macs['macs_before']:.2f}",
               m: f"{v.metrics[m]:.4f}", f"Δ {m} (pts)": f"{(v.metrics[m] - base.metrics[m]) * 100:+.2f}"}
        for rt in ("torch", "onnxruntime"):
            for b in ("1", "64"):
                sp = v.speedup.get(rt, {}).get(b)
                row[f"{rt} b={b}"] = "—" if sp is None or v is base else f"{sp.x:.2f}x [{sp.low:.2f}, {sp.high:.2f}]"
        rows.append(row)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("## Distillation: real product photos\n\n"
                        "Speedups against the fp32 teacher in the same runtime, paired 95% intervals, same run. "
                        "MACs from the student's stage (Torch-Pruning's counter at one image).\n\n"
                        + markdown_table(rows) + "\n\n" + text + f"\n_Total run time: {time.time() - t0:.0f} s._\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
