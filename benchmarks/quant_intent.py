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
import roofline  # noqa: E402

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


def _feeds(path: Path, x) -> dict:
    import onnxruntime as ort

    names = [i.name for i in ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).get_inputs()]
    return {n: t.numpy() for n, t in zip(names, x)}


def roofline_section(task, res, run_dir: Path) -> str:
    """The measured roofline (see roofline.py): what no int8 scheme can beat at batch 32."""
    r = res.result
    x = task.example_inputs(32, "val")
    tokens = int(x[0].numel())
    gflop, _ = model_gflop(task, 32)
    rates = roofline.gemm_rates(tokens, threads=r.threads)
    f2f = max(rates["dynamic"], rates["static"])
    free = max(rates[k] for k in ("dynamic", "static", "qlinear", "integer"))
    profiles = {}
    for v in r.variants:
        path = run_dir / "variants" / v.name / "model.onnx"
        if v.name != "baseline" and path.is_file() and "int4" not in v.name:
            profiles[v.name] = roofline.op_profile(path, _feeds(path, x), threads=r.threads)
    splits = {n: roofline.split(p, f2f) for n, p in profiles.items()}
    ref = splits[REFERENCE]
    floor_name = min(splits, key=lambda n: splits[n]["floor"])
    floor = splits[floor_name]["floor"]
    work = ref["gflop"]
    bound = ref["total"] / (floor + work / f2f * 1e3)
    bound_free = ref["total"] / (floor + work / free * 1e3)
    rows = [{"graph": n, "profiled ms": f"{s['total']:.1f}", "matmul ms": f"{s['matmul']:.1f}",
             "matmul GOP/s": f"{s['matmul_gops']:.0f}", "(de)quantize ms": f"{s['quant']:.1f}",
             "other ops ms": f"{s['other']:.1f}", "floor ms": f"{s['floor']:.1f}"} for n, s in splits.items()]
    ops = profiles[REFERENCE]["ms"]
    kept = roofline.MATMUL_OPS | roofline.ATTENTION_OPS | roofline.QUANT_OPS
    top = ", ".join([f"{k} {v:.1f}" for k, v in sorted(ops.items(), key=lambda kv: -kv[1]) if k not in kept][:6])
    best = min((v for v in r.variants if v.name != "baseline" and "onnxruntime" in v.latency_ms),
               key=lambda v: v.latency_ms["onnxruntime"]["32"].p50)
    x_best = (next(v for v in r.variants if v.name == REFERENCE).latency_ms["onnxruntime"]["32"].p50
              / best.latency_ms["onnxruntime"]["32"].p50)
    kernels = "; ".join(f"{roofline.KERNELS[k]} {rates[k]:.0f} {'GFLOP/s' if k == 'fp32' else 'GOP/s'}"
                        for k in roofline.KERNELS)
    if x_best >= 1.2:
        verdict = f"**The 1.2x bar is met here: {best.name} is {x_best:.2f}x faster than `{REFERENCE}`.**"
    elif bound < 1.2:
        verdict = (f"**No int8 scheme built from ONNX Runtime's kernels can be 1.2x faster than `{REFERENCE}` "
                   f"on this CPU: the ceiling is {bound:.2f}x** (measured best {best.name}, {x_best:.2f}x)"
                   + (f"; only activations quantized at no cost (a LayerNorm or GELU kernel writing uint8, "
                      f"which ONNX Runtime does not have) would lift it to {bound_free:.2f}x." if bound_free >= 1.2
                      else "."))
    else:
        verdict = (f"**The 1.2x bar is not met here** (measured best {best.name}, {x_best:.2f}x), although the "
                   f"ceiling ({bound:.2f}x) does not rule it out.")
    from slimcart.quantize.int8_features import detect

    features, scheme = detect()
    return (f"Roofline at batch 32 ({tokens} padded tokens, {r.threads} threads; CPU {r.environment.get('cpu')}, "
            f"int8 features {', '.join(features) or 'none'}: {scheme.level}): the model does {gflop:.1f} GFLOP of matmuls per call (PyTorch's FlopCounterMode; "
            f"{work:.1f} GFLOP from the profiled ONNX shapes). ONNX Runtime's kernels on a "
            f"({tokens}x384)·(384x1536) matmul: {kernels}.\n\n"
            "Where the time goes (ONNX Runtime's profiler, the same inputs; \"floor\": the time no int8 scheme "
            "removes, i.e. the float32 operators, plus what a fused attention operator takes beyond its FLOPs at "
            "the int8 rate):\n\n" + markdown_table(rows) + "\n\n"
            f"In `{REFERENCE}` the operators an int8 scheme does not touch take {ref['other']:.1f} of "
            f"{ref['total']:.1f} ms ({top} ms). Every int8 matmul here takes float32 activations and gives float32 "
            f"outputs (the operators on both sides are float32), so the fastest it can run is the best float-in, "
            f"float-out int8 kernel, {f2f:.0f} GOP/s. A scheme with all {work:.1f} GFLOP at that rate and the "
            f"smallest floor measured ({floor:.1f} ms, {floor_name}) takes {floor + work / f2f * 1e3:.1f} ms: at "
            f"most **{bound:.2f}x** faster than `{REFERENCE}`. Even with quantization for free (uint8 "
            f"activations at the MatMulInteger rate, {free:.0f} GOP/s) the ceiling is {bound_free:.2f}x. "
            + verdict + "\n")


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
    roof = roofline_section(task, res, args.runs / "intent-banking77-int8")
    table = markdown_table(against_reference(res, "32"))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("## Quantization: the intent model's int8 schemes against ONNX Runtime's own dynamic INT8\n\n"
                        + ("_Smoke run (--quick): timings are not meaningful._\n\n" if args.quick else "")
                        + f"Against `{REFERENCE}` at batch 32, ONNX Runtime, same run:\n\n" + table + "\n\n"
                        + roof + "\n" + text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
