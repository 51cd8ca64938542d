"""Distillation on real product photos (Grocery Store, 43 classes): the ImageNet-pretrained
EfficientNet-Lite0 fine-tuned at 224 px is the teacher. The student is the teacher's own network with
fewer blocks per stage (``--blocks``: the residual blocks whose skipping moves its predictions least
are removed) that resizes its input to ``--resolution`` px inside the model, distilled from the
teacher's soft targets and pooled features (``--hidden``) on the stored photos and on crop-and-flip
copies the teacher scores at each step (``augment_crop``), then BatchNorm folded: the shipped ``product_image/distill-shallow``. Beside
it, the same student trained on the labels alone; all timed in one run against the teacher.

Earlier students measured with this script: the teacher with 52% of its channels removed reached 44%
test accuracy; the full-depth teacher at 112 px (0.28 of the MACs) 79.1%, 80.4% with crops and 79.6%
on labels alone, against the teacher's 86.8%, and only 2.1-2.2x faster at batch 1.

Needs the photos in $SLIMCART_DATA_DIR/images/grocery-store (see ../shared/data/README.md).
Writes benchmarks/results/distill_images.md. Run from the repository root."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from common import grocery_store, markdown_table, run_section  # noqa: E402

from slimcart.recipe import MeasureConfig, Recipe  # noqa: E402

FOLD = [{"type": "fold_bn", "max_abs_error": 1e-4}]
# the student of the shipped recipe product_image/distill-shallow
SHIPPED = {"blocks": [1, 1, 1, 1, 1, 1, 1], "resolution": 160, "stem_stride": 0, "crop": 0.6, "epochs": 8.0, "lr": 1e-3,
           "hidden": 16.0}


def student_recipe(name: str, distilled: bool, blocks: list[int] | None, resolution: int, epochs: float,
                   lr: float | None, crop: float = 0.0, hidden: float = 0.0, stem_stride: int = 0) -> Recipe:
    """Distil (labels only: alpha 1) into the teacher with ``blocks`` per stage at ``resolution`` px
    (0: the teacher's) and its first convolution at ``stem_stride`` (0: the teacher's) (with ``crop``:
    also on crop-and-flip copies the teacher scores), then fold BatchNorm."""
    student = {**({"resolution": resolution} if resolution else {}), **({"blocks": blocks} if blocks else {}),
               **({"stem_stride": stem_stride} if stem_stride else {})}
    stage = {"type": "distill", "student": student, "epochs": epochs, "temperature": 4.0,
             "alpha": 0.3 if distilled else 1.0, "augment_crop": crop if distilled else 0.0,
             "hidden_loss": hidden if distilled else 0.0,
             **({"lr": lr} if lr else {})}
    shape = (f"{blocks} blocks per stage at " if blocks else "full depth at ") + \
        (f"stem stride {stem_stride}, " if stem_stride else "")
    return Recipe.from_dict({"name": name, "version": 1, "stages": [stage] + FOLD,
                             "description": (f"student: the teacher with {shape}{resolution or 224} px, " +
                                             ("distilled from the teacher" if distilled else "labels only") +
                                             (f", plus crop-and-flip copies (>= {crop:g} of each side)" if crop and distilled else "") +
                                             (f", pooled features matched (weight {hidden:g})" if hidden and distilled else "") +
                                             ", BatchNorm folded")})


def verdict(v, base, m: str, macs: dict) -> str:
    """The bar: at most 1/4 of the teacher's MACs, within 1.5 points, >= 3x faster at b=1 and b=64."""
    ratio, drop = macs["macs_after"] / macs["macs_before"], (base.metrics[m] - v.metrics[m]) * 100
    speed = {f"{rt} b={b}": v.speedup[rt][b].x for rt in v.speedup for b in ("1", "64") if b in v.speedup[rt]}
    fails = ([f"{ratio:.2f} of the MACs"] if ratio > 0.25 else []) + \
        ([f"{drop:.2f} points below the teacher"] if drop > 1.5 else []) + \
        [f"{k} {x:.2f}x" for k, x in speed.items() if x < 3.0]
    if not fails:
        return f"**Bar met by {v.name}**: {ratio:.2f} of the MACs, {drop:+.2f} points, {min(speed.values()):.2f}x or faster.\n\n"
    return f"**Bar not met by {v.name}** (at most 1/4 of the MACs, within 1.5 points, 3x at b=1 and b=64): " \
        + "; ".join(fails) + ".\n\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="benchmarks/results/distill_images.md", type=Path)
    ap.add_argument("--runs", default="runs/bench", type=Path)
    ap.add_argument("--blocks", default=SHIPPED["blocks"], type=lambda v: [int(b) for b in v.split(",")],
                    help="blocks kept per stage, comma-separated (EfficientNet-Lite0 has 1,2,2,3,3,4,1)")
    ap.add_argument("--resolution", default=SHIPPED["resolution"], type=int, help="0: no resize (224 px)")
    ap.add_argument("--stem-stride", dest="stem_stride", default=SHIPPED["stem_stride"], type=int,
                    help="stride of the students' first convolution (0: the teacher's, 2)")
    ap.add_argument("--crop", default=SHIPPED["crop"], type=float, help="augment_crop of the distilled student")
    ap.add_argument("--epochs", default=SHIPPED["epochs"], type=float)
    ap.add_argument("--lr", default=SHIPPED["lr"], type=float, help="learning rate of both students")
    ap.add_argument("--hidden", default=[SHIPPED["hidden"]], type=lambda v: [float(h) for h in v.split(",")],
                    help="hidden_loss of the distilled student (MSE to the teacher's pooled features); "
                         "comma-separated: one distilled student each")
    ap.add_argument("--no-labels-only", action="store_true",
                    help="leave out the student trained on the labels alone (one training run less)")
    args = ap.parse_args()
    data = grocery_store()
    t0 = time.time()
    tag = f"r{args.resolution or 224}" + (f"-s{args.stem_stride}" if args.stem_stride else "")
    distilled = []
    for h in args.hidden:
        given = {**{k: getattr(args, k) for k in SHIPPED}, "hidden": h}
        distilled.append("product_image/distill-shallow" if given == SHIPPED else
                         student_recipe(f"distill-{tag}" + (f"-feat{h:g}" if h else ""), True, args.blocks,
                                        args.resolution, args.epochs, args.lr, args.crop, h, args.stem_stride))
    recipes = ["product_image/onnx", *distilled]
    if not args.no_labels_only:
        recipes.append(student_recipe(f"labels-only-{tag}", False, args.blocks, args.resolution, args.epochs, args.lr,
                                      stem_stride=args.stem_stride))
    measure = MeasureConfig(batch_sizes=[1, 64], runtimes=["torch", "onnxruntime"], deployed=False,
                            memory=False, throughput_seconds=0)
    text, res = run_section("product_image", str(data), recipes, args.runs, "distill", measure=measure)
    r = res.result
    base, m = r.baseline, r.primary_metric
    rows, verdicts = [], []
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
        if macs is not None and st is not None and "soft" in st.get("terms", {}):
            verdicts.append(verdict(v, base, m, macs))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    shipped = all(r == "product_image/distill-shallow" for r in distilled)
    args.out.write_text("## Distillation: real product photos"
                        + ("" if shipped else f" (students at {args.resolution or 224} px"
                           + (f", stem stride {args.stem_stride}" if args.stem_stride else "")
                           + (", pooled features matched" if any(args.hidden) else "") + ")") + "\n\n"
                        "Speedups against the fp32 teacher in the same runtime, paired 95% intervals, same run. "
                        "MACs from the student's stage (Torch-Pruning's counter at one image). Teacher: "
                        f"val {base.val_metrics.get(m, float('nan')):.3f}, test {base.metrics[m]:.3f}.\n\n"
                        + "".join(verdicts) + markdown_table(rows) + "\n\n" + text + f"\n_Total run time: {time.time() - t0:.0f} s._\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
