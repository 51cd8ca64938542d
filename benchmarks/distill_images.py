"""Distillation on real product photos (Grocery Store, 43 classes): the ImageNet-pretrained
EfficientNet-Lite0 fine-tuned at 224 px is the teacher; the student is the same network with half of
its channels removed (--width 0.48: under 1/4 of the MACs), trained from the teacher's soft targets,
next to the same student trained on the labels alone, and the distilled student stacked with static
INT8 (exported, QDQ, calibrated on 512 training photos); all timed in one run against the teacher.
Measured 2026-12-03: the students reach only 44% against the teacher's 87% (BENCHMARKS.md), so no
stacked photo recipe is shipped yet.

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

from slimcart.recipe import MeasureConfig, Recipe  # noqa: E402

THEN_INT8 = [{"type": "onnx_export", "opset": 17},
             {"type": "ort_int8_static", "calibrate_method": "percentile", "calibration_size": 512}]


def student_recipe(name: str, distilled: bool, width: float, epochs: float, then: list | None = None) -> Recipe:
    """Distil (labels only: alpha 1) into the teacher with ``width`` of its channels, then ``then``."""
    stage = {"type": "distill", "student": {"width": width}, "epochs": epochs, "temperature": 4.0,
             "alpha": 0.3 if distilled else 1.0}
    stages = [stage] + list(then or [])
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
                              then=THEN_INT8)]
    measure = MeasureConfig(batch_sizes=[1, 64], runtimes=["torch", "onnxruntime"], deployed=False,
                            memory=False, throughput_seconds=0)
    text, res = run_section("product_image", str(data), recipes, args.runs, "distill", measure=measure)
    r = res.result
    base, m = r.baseline, r.primary_metric
    rows = []
    for v in r.variant_rows():
        macs = next((s["stats"]["student_narrowed"] for s in v.stages if "student_narrowed" in s.get("stats", {})), None)
        st = next((s["stats"] for s in v.stages if "student_val" in s.get("stats", {})), None)
        row = {"Variant": v.name, "MACs vs teacher": "1.00" if macs is None else f"{macs['macs_after'] / macs['macs_before']:.2f}",
               f"student val {m}: narrowed → trained": "—" if st is None else
               f"{st['student_val_before'][m]:.3f} → {st['student_val'][m]:.3f}",
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
