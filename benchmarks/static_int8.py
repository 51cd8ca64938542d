"""Static INT8 (ONNX Runtime QDQ, calibrated) and QAT against float and dynamic INT8.

    python benchmarks/static_int8.py                  # both tasks
    python benchmarks/static_int8.py --only product_image
    python benchmarks/static_int8.py --quick          # smoke run: minimal rounds, 512 scored rows, 20 QAT steps

product_image (Fashion-MNIST CNN, batch 1 and 64): fp32 eager, ONNX fp32, the old dynamic ConvInteger
recipe (why it was removed), static INT8 with each calibration method with and without 7-bit weights
(reduce_range), the shipped static-int8 recipe (scheme chosen for this CPU) and QAT. intent
(banking77 MiniLM, batch 1 and 32): dynamic INT8 (intent/onnx-int8, onnx-fused-int8) against static.
Writes benchmarks/results/static_int8.md: accuracy, size, p50 and speedups against fp32 eager PyTorch in
the same interleaved run, the CPU's int8 features and the scheme chosen, and what each stage did.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from common import markdown_table, run_section
from slimcart.accelerate.onnx_export import OnnxExportConfig
from slimcart.accelerate.ort_transformers import OrtTransformerOptimizeConfig
from slimcart.quantize import int8_features
from slimcart.quantize.ort import OrtInt8DynamicConfig
from slimcart.quantize.qat import QatConfig
from slimcart.quantize.static_ort import OrtInt8StaticConfig
from slimcart.recipe import MeasureConfig, Recipe

IMAGE = {"batch_sizes": [1, 64], "runtimes": ["torch", "onnxruntime"]}
TEXT = {"batch_sizes": [1, 32], "runtimes": ["torch", "onnxruntime"]}
TEXT_STATIC = dict(op_types=["MatMul", "Gemm", "Gather"], matmul_const_b_only=True, calibrate_method="entropy",
                   calibration_size=256, calibration_batch=32)


def _inline(name: str, stages: list, measure: dict, description: str) -> Recipe:
    return Recipe(stages, MeasureConfig(**measure), name=name, description=description)


def image_recipes(quick: bool) -> list:
    out = ["product_image/onnx",
           _inline("dynamic-convinteger",
                   [OnnxExportConfig(), OrtInt8DynamicConfig(op_types=["Conv", "Gemm", "MatMul"])],
                   IMAGE, "the removed product_image/onnx-int8 recipe: dynamic INT8 (ConvInteger)")]
    for method in ("minmax", "entropy", "percentile"):
        for rr in (True, False):
            out.append(_inline(f"static-{method}-{'7bit' if rr else '8bit'}",
                               [OnnxExportConfig(), OrtInt8StaticConfig(calibrate_method=method, reduce_range=rr)],
                               IMAGE, f"static INT8, {method} calibration, {'7' if rr else '8'}-bit weights"))
    out.append("product_image/static-int8")
    out.append(_inline("qat-int8", [QatConfig(train={"epochs": 1.0, "max_steps": 20})], IMAGE, "QAT, 20 steps")
               if quick else "product_image/qat-int8")
    return out


def text_recipes(quick: bool) -> list:
    return ["intent/onnx-int8", "intent/onnx-fused-int8", "intent/static-int8",
            _inline("static-fused", [OnnxExportConfig(), OrtTransformerOptimizeConfig(max_abs_error=1e-4),
                                     OrtInt8StaticConfig(**TEXT_STATIC)], TEXT,
                    "transformer fusions, then static INT8 of the MatMuls (fused Attention stays float)")]


CASES = [("product_image", "fashion-mnist", IMAGE, image_recipes), ("intent", "banking77", TEXT, text_recipes)]


def vs_eager(res) -> list[dict]:
    """ONNX Runtime p50 of each variant against fp32 eager PyTorch's, from the same interleaved run."""
    r = res.result
    eager = r.baseline.latency_ms.get("torch", {})
    rows = []
    for v in r.variant_rows():
        row = {"Variant": "baseline (float, converted to ONNX)" if v is r.baseline else v.name, "Format": v.format}
        key, base = r.primary_metric or next(iter(v.metrics)), r.baseline.metrics
        row[key] = f"{v.metrics[key]:.4f} ({100 * (v.metrics[key] - base[key]):+.2f})"
        ort = v.latency_ms.get("onnxruntime", {})
        for b in sorted(eager, key=int):
            if b in ort:
                row[f"ORT b={b} ms"] = f"{ort[b].p50:.2f}"
                row[f"b={b} vs eager"] = f"{eager[b].p50 / ort[b].p50:.2f}x"
        rows.append(row)
    return rows


def stage_notes(res) -> list[str]:
    lines = []
    for v in res.result.variants:
        for st in v.stages:
            s = st["stats"]
            if st["technique"] in ("ort_int8_static", "qat"):
                got = [f"integer ops {s.get('integer_ops_after_ort_optimization')}",
                       f"parity vs {s.get('parity_reference')}: top-1 {s.get('agreement_top1_agreement', 0):.4f}, "
                       f"max rel {s.get('max_rel_error', 0):.3g}"]
                if "calibration" in s:
                    got.append(f"calibration {s['calibration']}")
                if st["technique"] == "qat":
                    got.append(f"val {s['val_float']:.4f} float, {s['val_fake_quant_before']:.4f} fake-quant before, "
                               f"{s['val_fake_quant_after']:.4f} after {s['train']['steps']} steps "
                               f"({s['train']['seconds']} s)")
                skipped = len(st.get("skipped", {}))
                got.append(f"{len(st.get('changed', {}))} nodes changed, {skipped} skipped")
                got += st.get("notes", [])
                lines.append(f"- {v.name} / {st['technique']}: " + "; ".join(got))
            elif st["technique"] == "ort_int8_dynamic":
                ops = {k: n for k, n in s.get("ops_after", {}).items() if "Integer" in k or k[0] == "Q"}
                lines.append(f"- {v.name} / ort_int8_dynamic: int8 ops {ops}")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results/static_int8.md", type=Path)
    ap.add_argument("--runs", default="runs/bench", type=Path)
    ap.add_argument("--only", default=None, help="a task name to run alone (the file then holds it alone)")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: 30 rounds x 1 call, 512 scored rows, 20 QAT steps, no deployed/throughput/memory")
    args = ap.parse_args()
    features, scheme = int8_features.detect()
    head = (f"CPU int8 features: {', '.join(features) or 'none'}; scheme chosen by `auto`: activations "
            f"{scheme.activation_type}, weights {scheme.weight_type}, reduce_range {scheme.reduce_range} - "
            f"{scheme.reason}.\n")
    sections = []
    for task, dataset, measure, recipes in CASES:
        if args.only and task != args.only:
            continue
        quick = dict(rounds=30, calls_per_block=1, eval_limit=512, deployed=False, throughput_seconds=0,
                     memory=False) if args.quick else {}
        text, res = run_section(task, dataset, recipes(args.quick), args.runs, "static-int8",
                                measure=MeasureConfig(**measure, **quick))
        sections.append(text + "\nONNX Runtime against fp32 eager PyTorch (p50 ratio, same run; accuracy "
                        "with its change in points):\n\n" + markdown_table(vs_eager(res))
                        + "\n\nWhat the quantization stages did:\n\n" + "\n".join(stage_notes(res)) + "\n")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("## Static INT8 and QAT (ONNX Runtime QDQ)\n\n"
                        + ("_Smoke run (--quick): timings are not meaningful._\n\n" if args.quick else "")
                        + head + "\n" + "\n".join(sections))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
