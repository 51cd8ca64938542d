"""Training speed of the product-photo networks in the default (NCHW) and the channels-last (NHWC)
memory layout, which the trainer uses for convolutional image models (``trainer.use_channels_last``).

Three steps, each timed in both layouts, interleaved round by round in one process (paired
bootstrap intervals of the ratio, as every speedup in BENCHMARKS.md):
- the teacher's forward pass at 224 px, batch 32 (what distillation's crop copies cost per step);
- a fine-tuning step of the teacher (forward, backward, AdamW), batch 32;
- a training step of the product_image/distill-shallow student (7 blocks, resized to 160 px inside
  the model), batch 32.
Timing depends on the shapes only, so the weights are ImageNet's and the pixels random; the
layouts compute the same values up to summation order (tests/test_trainer.py).

Writes benchmarks/results/train_layout.md. Run from the repository root."""
from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from common import markdown_table  # noqa: E402

from slimcart.measure.latency import Timing  # noqa: E402
from slimcart.measure.stats import speedup  # noqa: E402
from slimcart.models import efficientnet  # noqa: E402
from slimcart.models.drop_blocks import apply_kept_blocks  # noqa: E402
from slimcart.models.input_resize import apply_input_resize  # noqa: E402
from slimcart.pipeline import environment  # noqa: E402

CL = torch.channels_last


def network(blocks: bool) -> torch.nn.Module:
    model = efficientnet.build_efficientnet_lite0(efficientnet.EfficientNetLite0Config(num_classes=43))
    if blocks:
        apply_kept_blocks(model, [[0]] * 7)
        apply_input_resize(model, [160, 160])
    return model


def cases(batch: int) -> dict[str, dict[str, callable]]:
    """name -> {layout: one call}; each layout has its own copy of the model and optimizer."""
    x = torch.rand(batch, 3, 224, 224)
    y = torch.randint(0, 43, (batch,))
    out = {}
    for name, blocks, train in (("teacher forward (crop-copy targets)", False, False),
                                ("teacher fine-tuning step", False, True),
                                ("distill-shallow student training step", True, True)):
        per = {}
        for layout in ("NCHW", "NHWC"):
            model = network(blocks)
            xi = x
            if layout == "NHWC":
                model, xi = model.to(memory_format=CL), x.contiguous(memory_format=CL)
            if train:
                opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
                model.train()

                def call(model=model, xi=xi, opt=opt):
                    opt.zero_grad(set_to_none=True)
                    torch.nn.functional.cross_entropy(model(xi), y).backward()
                    opt.step()
            else:
                model.eval()

                def call(model=model, xi=xi):
                    with torch.inference_mode():
                        model(xi)
            per[layout] = call
        out[name] = per
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results/train_layout.md", type=Path)
    ap.add_argument("--rounds", default=12, type=int)
    ap.add_argument("--batch", default=32, type=int)
    ap.add_argument("--threads", default=2, type=int)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    t0 = time.time()
    rows = []
    for name, per in cases(args.batch).items():
        for call in per.values():  # warm-up: first calls allocate and pick kernels
            call()
            call()
        rounds = {k: [] for k in per}
        order = list(per)
        for _ in range(args.rounds):
            random.shuffle(order)
            for k in order:
                s = time.perf_counter()
                per[k]()
                rounds[k].append([(time.perf_counter() - s) * 1e3])
        timing = {k: Timing(v, args.batch, 1) for k, v in rounds.items()}
        sp = speedup(timing["NCHW"], timing["NHWC"])
        rows.append({"step (batch %d)" % args.batch: name,
                     "NCHW p50 ms": f"{timing['NCHW'].summary()['p50']:.0f}",
                     "NHWC p50 ms": f"{timing['NHWC'].summary()['p50']:.0f}",
                     "NHWC speedup [95% CI]": f"{sp['x']:.2f}x [{sp['low']:.2f}, {sp['high']:.2f}]"
                     + (" =" if sp["verdict"] == "no measured difference" else "")})
        print(rows[-1], flush=True)
    env = environment()
    features = env["cpu_features"]
    features = ", ".join(features) if isinstance(features, (list, tuple)) else str(features)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        "## Training in the channels-last layout (product-photo networks)\n\n"
        "`python benchmarks/train_layout.py`: one step of each case in the default NCHW layout and in "
        "channels-last (NHWC), interleaved in a shuffled order over "
        f"{args.rounds} rounds, {args.threads} threads, PyTorch {torch.__version__}, CPU: {env['cpu']} "
        f"({features}). "
        "The trainer now trains convolutional models on photos of 64 px and more channels-last (one process; the layout is "
        "put back after training).\n\n" + markdown_table(rows)
        + f"\n\n_Run time: {time.time() - t0:.0f} s._\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
