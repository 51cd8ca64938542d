"""The intent model's INT8 schemes in one run: ONNX Runtime dynamic INT8 (`intent/onnx-int8`, what
ONNX Runtime's own quantizer gives a user), with the transformer fusions, static QDQ, MatMulNBits
weight-only, and mixed precision; each against `intent/onnx-int8` at batch 32, with the measured
int8 GEMM rate of this CPU as the ceiling of what any int8 scheme can reach.

Writes benchmarks/results/quant_intent.md. Run from the repository root."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from common import baseline, markdown_table, run_section  # noqa: E402
from roofline import gemm_rates  # noqa: E402

from slimcart.recipe import MeasureConfig, shipped_recipes  # noqa: E402

RECIPES = ["intent/onnx-int8", "intent/onnx-fused-int8", "intent/static-int8", "intent/onnx-int4-weights",
           "intent/onnx-int8-mixed"]
REFERENCE = "onnx-int8"


def model_gflop(task, batch: int) -> tuple[float, int]:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    model = baseline(task).eval()
    x = task.example_inputs(batch, "val")
    with torch.inference_mode(), FlopCounterMode(display=False) as fc:
        model(*x)
    return fc.get_total_flops() / 1e9, int(x[0].numel())


def against_reference(res, batch: str) -> list[dict]:
    r = res.result
    by = {v.name: v for v in r.variants}
    ref = by[REFERENCE].latency_ms["onnxruntime"][batch].p50
    m = r.primary_metric
    rows = []
    for v in r.variant_rows():
        p = v.latency_ms.get("onnxruntime", {}).get(batch)
        if p is None:
            continue
        rows.append({"Variant": v.name, "MB": f"{v.size_bytes_served.get('onnxruntime', v.size_bytes) / 1e6:.2f}",
                     m: f"{v.metrics[m]:.4f}",
                     f"Δ {m} vs fp32 (pts)": f"{(v.metrics[m] - r.baseline.metrics[m]) * 100:+.2f}",
                     f"ORT p50 ms b={batch}": f"{p.p50:.2f} [{p.p50_low:.2f}, {p.p50_high:.2f}]",
                     f"x vs {REFERENCE} (p50 ratio)": f"{ref / p.p50:.2f}x",
                     "speed gate": v.gate.get("verdict", "—") if v is not r.baseline else "—"})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="benchmarks/results/quant_intent.md", type=Path)
    ap.add_argument("--runs", default="runs/bench", type=Path)
    ap.add_argument("--quick", action="store_true", help="smoke run: timings are not meaningful")
    args = ap.parse_args()
    import slimcart as sc

    have = set(shipped_recipes())
    recipes = [r for r in RECIPES if r in have]
    quick = dict(rounds=30, calls_per_block=1, eval_limit=512, deployed=False, throughput_seconds=0,
                 memory=False) if args.quick else dict(deployed=False, memory=False, throughput_seconds=0)
    measure = MeasureConfig(batch_sizes=[1, 32], runtimes=["torch", "onnxruntime"], **quick)
    text, res = run_section("intent", "banking77", recipes, args.runs, "int8", measure=measure)
    task = sc.load_task("intent", "banking77")
    gflop, tokens = model_gflop(task, 32)
    rates = gemm_rates(tokens, threads=res.result.threads)
    ref = next(v for v in res.result.variants if v.name == REFERENCE).latency_ms["onnxruntime"]["32"].p50
    got = gflop / (ref / 1e3)
    best = min((v for v in res.result.variants if "onnxruntime" in v.latency_ms),
               key=lambda v: v.latency_ms["onnxruntime"]["32"].p50)
    x_best = ref / best.latency_ms["onnxruntime"]["32"].p50
    roof = (f"Roofline at batch 32 ({tokens} padded tokens): the model does {gflop:.1f} GFLOP per call "
            f"(PyTorch's FlopCounterMode). On this CPU ONNX Runtime runs a ({tokens}x384)·(384x1536) matmul "
            f"at {rates['fp32']:.0f} GFLOP/s in fp32 and {rates['int8']:.0f} GOP/s in int8 (dynamic "
            f"activation quantization + MatMulInteger, the kernel every int8 scheme here ends in: "
            f"{rates['int8'] / rates['fp32']:.2f}x fp32). `{REFERENCE}` reaches {got:.0f} GOP/s at batch 32, "
            f"{got / rates['int8']:.0%} of that int8 rate, so no int8 scheme can be more than "
            f"{rates['int8'] / got:.2f}x faster than it (all of the work at the int8 GEMM rate). "
            f"Measured best here: {best.name}, {x_best:.2f}x.\n")
    table = markdown_table(against_reference(res, "32"))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("## Quantization: the intent model's int8 schemes against ONNX Runtime's own dynamic INT8\n\n"
                        + ("_Smoke run (--quick): timings are not meaningful._\n\n" if args.quick else "")
                        + f"Against `{REFERENCE}` at batch 32, ONNX Runtime, same run:\n\n" + table + "\n\n"
                        + roof + "\n" + text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
