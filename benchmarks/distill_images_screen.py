"""Screen one training setting of the product-photo student: distil the cached fine-tuned
EfficientNet-Lite0 teacher (the one benchmarks/distill_images.py uses) into one student (``--hidden``:
also matching the teacher's pooled features) and record its validation and test accuracy. No timing: runs may share the machine (``--threads 1``, two at a
time). Pick settings by validation accuracy; the test column is there to show how little a
validation difference at this size means.

Each run appends a line to benchmarks/results/distill_images_screen.jsonl and rewrites
benchmarks/results/distill_images_screen.md from all lines. Example (the shipped recipe's student):

    python benchmarks/distill_images_screen.py --blocks 1,1,1,1,1,1,1 --resolution 160 --lr 1e-3 --epochs 8

Needs the photos in $SLIMCART_DATA_DIR/images/grocery-store (see ../shared/data/README.md)."""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from common import baseline, grocery_store, markdown_table  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def stage(args) -> dict:
    student = {"blocks": args.blocks, **({"resolution": args.resolution} if args.resolution else {}),
               **({"stem_stride": args.stem_stride} if args.stem_stride else {})}
    return {"type": "distill", "student": student,
            "epochs": args.epochs, "lr": args.lr, "alpha": args.alpha, "temperature": args.temperature,
            "augment_crop": args.crop, "augment_mixup": args.mixup, "hidden_loss": args.hidden,
            **({"seed": args.seed} if args.seed else {}), **({"soup": args.soup} if args.soup > 1 else {})}


def render(lines: list[dict]) -> str:
    rows = [{"blocks": ",".join(map(str, d["stage"]["student"]["blocks"])), "px": d["stage"]["student"].get("resolution", 224),
             "stem stride": d["stage"]["student"].get("stem_stride", 2),
             "MACs vs teacher": f"{d['macs']:.3f}",
             "epochs": f"{d['stage']['epochs']:g}", "lr": f"{d['stage']['lr']:g}", "alpha": f"{d['stage']['alpha']:g}",
             "T": f"{d['stage']['temperature']:g}", "crop": f"{d['stage']['augment_crop']:g}",
             "mixup": f"{d['stage']['augment_mixup']:g}", "seed": d["stage"].get("seed", 0), "soup": d["stage"].get("soup", 1), "pooled features": f"{d['stage'].get('hidden_loss', 0):g}",
             "val accuracy": f"{d['val']['accuracy']:.3f}",
             "test accuracy": f"{d['test']['accuracy'] * 100:.2f}%", "train s": d["seconds"], "threads": d["threads"]}
            for d in lines]
    return ("## Distillation: product-photo student settings, screened\n\n"
            "`python benchmarks/distill_images_screen.py`: one training run per row, no timing, the "
            "teacher of `benchmarks/distill_images.py`. Single runs: with 2485 test photos, "
            "one standard error of a test accuracy near 84% is 0.7 points, and the 220 validation photos "
            "are near saturation, so differences under a point are not measured differences. `pooled features` "
            "is the weight of the MSE to the teacher's pooled features (`hidden_loss`); rows with it trained in "
            "the channels-last layout, so their `train s` is not comparable with the rows above them. `stem stride` "
            "is the stride of the student's first convolution (the teacher's is 2; 3 on the 224 px photos gives "
            "75 x 75 feature maps, as a 150 px input would, with no resize in the model).\n\n"
            + markdown_table(rows) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--blocks", default=[1] * 7, type=lambda v: [int(b) for b in v.split(",")],
                    help="blocks kept per stage, comma-separated (EfficientNet-Lite0 has 1,2,2,3,3,4,1)")
    ap.add_argument("--resolution", default=160, type=int, help="0: no resize (the teacher's 224 px)")
    ap.add_argument("--stem-stride", default=0, type=int,
                    help="stride of the student's first convolution (0: the teacher's, 2)")
    ap.add_argument("--epochs", default=8.0, type=float)
    ap.add_argument("--lr", default=1e-3, type=float)
    ap.add_argument("--alpha", default=0.3, type=float, help="weight of the label loss")
    ap.add_argument("--temperature", default=4.0, type=float)
    ap.add_argument("--crop", default=0.6, type=float, help="augment_crop")
    ap.add_argument("--mixup", default=0.0, type=float, help="augment_mixup")
    ap.add_argument("--hidden", default=0.0, type=float,
                    help="hidden_loss: weight of the MSE to the teacher's pooled features")
    ap.add_argument("--seed", default=0, type=int, help="the student's seed (its crops, batches and fresh layers)")
    ap.add_argument("--soup", default=1, type=int,
                    help="students averaged (seeds seed, seed+1, ...; BatchNorm recomputed): soup")
    ap.add_argument("--threads", default=2, type=int)
    ap.add_argument("--results", default=RESULTS, type=Path, help="folder of the .jsonl log and the .md table")
    args = ap.parse_args()
    data = grocery_store()
    import torch

    import slimcart as sc
    from slimcart.pipeline import apply_recipe, baseline_state, environment
    from slimcart.recipe import Recipe

    torch.set_num_threads(args.threads)
    task = sc.load_task("product_image", str(data))
    state, _, _ = baseline_state(baseline(task, "full"), task)
    recipe = Recipe.from_dict({"name": "screen", "version": 1, "stages": [stage(args)]})
    t0 = time.time()
    with tempfile.TemporaryDirectory() as work:
        out, reports = apply_recipe(state, recipe, task, Path(work), progress=False)
    seconds = round(time.time() - t0)
    macs = reports[0].stats["student_narrowed"]
    line = {"stage": stage(args), "macs": macs["macs_after"] / macs["macs_before"], "val": task.evaluate(out.torch_model, "val"),
            "test": task.evaluate(out.torch_model, "test"), "seconds": seconds, "threads": args.threads,
            "cpu": environment()["cpu"]}
    if "soup" in reports[0].stats:  # validation accuracy of each averaged student
        line["soup_students_val"] = reports[0].stats["soup"]["students_val"]
    print(json.dumps(line))
    args.results.mkdir(parents=True, exist_ok=True)
    log = args.results / "distill_images_screen.jsonl"
    with log.open("a") as f:
        f.write(json.dumps(line) + "\n")
    lines = [json.loads(x) for x in log.read_text().splitlines() if x.strip()]
    (args.results / "distill_images_screen.md").write_text(render(lines))
    print(f"wrote {args.results / 'distill_images_screen.md'}")


if __name__ == "__main__":
    main()
