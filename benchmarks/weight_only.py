"""Weight-only INT8/INT4, mixed-precision INT8 and half precision on the trained baselines.

    python benchmarks/weight_only.py                      # every section (about 1 h on 2 idle cores)
    python benchmarks/weight_only.py --only kernels       # one section: kernels, intent, half
    python benchmarks/weight_only.py --quick              # smoke run: minimal rounds, 256 scored rows

Writes benchmarks/results/weight_only.md:
- kernels: one Linear of MiniLM's shapes, float vs dequantize-at-forward (what ``weight_only``
  runs) vs PyTorch's own weight-only kernels vs dynamic INT8, at 16 and 512 tokens;
- intent (banking77 MiniLM): fp32 eager and ONNX, ``intent/onnx-int8`` (dynamic INT8),
  MatMulNBits int4/int8 with accuracy_level 0 and 4, ``intent/onnx-int4-weights`` (embedding
  tables too), PyTorch weight_only int8/int4, dynamic INT8 and its mixed-precision versions; each
  p50 also as a ratio against ``onnx-int8`` in ONNX Runtime, measured in the same run;
- half: bfloat16/float16 on product_image (Fashion-MNIST CNN) and intent: PyTorch sections
  (bf16 cannot be exported for ONNX Runtime) and ONNX Runtime sections (fp16 graph).
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from common import markdown_table, run_section
from slimcart.accelerate.onnx_export import OnnxExportConfig
from slimcart.measure import hardware
from slimcart.quantize.dynamic import Int8DynamicConfig
from slimcart.quantize.half import HalfConfig
from slimcart.quantize.sensitivity import Int8MixedConfig, OrtInt8MixedConfig
from slimcart.quantize.weight_only import OrtWeightOnlyConfig, WeightOnlyConfig
from slimcart.recipe import MeasureConfig, Recipe
from slimcart.report.markdown import batch_key

TEXT = {"batch_sizes": [1, 32], "runtimes": ["torch", "onnxruntime"]}
IMAGE = {"batch_sizes": [1, 32], "runtimes": ["torch", "onnxruntime"]}
REFERENCE = "onnx-int8"
HALF_ELSEWHERE = (
    "### Half precision\n\nThis CPU has no native bfloat16/float16 arithmetic (no AVX-512-BF16/FP16 or AMX): "
    "PyTorch emulates them 13-15x slower than float32, so the `torch` runtime refuses them here with that reason. "
    "They are measured where they run natively: on a Xeon with AMX (section `int8_cpu_xeon_*`: bf16 1.8x at b=64, "
    "0.91x at b=1) and on an H200 (section `gpu.md`).\n")


def _inline(name, stages, description):
    return Recipe(stages, name=name, description=description)


def nbits(bits, block, level):
    return _inline(f"nbits{bits}-acc{level}", [OnnxExportConfig(), OrtWeightOnlyConfig(
        bits=bits, block_size=block, accuracy_level=level)],
        f"MatMulNBits int{bits}, blocks of {block}, accuracy_level {level}")


def intent_recipes(limit):
    mixed = {"max_drop": 0.5, "limit": limit}
    return [
        "intent/onnx-int8",
        nbits(4, 32, 0), nbits(4, 32, 4), nbits(8, 128, 0), nbits(8, 128, 4),
        "intent/onnx-int4-weights",
        _inline("wo-int8", [WeightOnlyConfig(bits=8, group_size=128)], "weight_only int8, groups of 128"),
        _inline("wo-int4", [WeightOnlyConfig(bits=4, group_size=32)], "weight_only int4, groups of 32"),
        _inline("int8-dynamic", [Int8DynamicConfig()], "PyTorch dynamic INT8, every Linear"),
        _inline("int8-mixed", [Int8MixedConfig(**mixed)], "int8_mixed, max_drop 0.5 pt"),
        _inline("onnx-int8-mixed", [OnnxExportConfig(), OrtInt8MixedConfig(op_types=["MatMul", "Gemm", "Gather"],
                                                                            **mixed)],
                "ort_int8_mixed, max_drop 0.5 pt"),
    ]


def half_torch(dtypes=("bfloat16", "float16")):
    return [_inline(f"half-{d}", [HalfConfig(dtype=d)], f"half {d}, norm layers float32") for d in dtypes]


def half_onnx():
    return [_inline("onnx-fp16", [OnnxExportConfig(), HalfConfig(dtype="float16")], "ONNX float16 graph")]


def vs_reference(res) -> str:
    """p50 of each variant and runtime as a ratio against onnx-int8 in ONNX Runtime (>1: faster)."""
    r = res.result
    ref = next((v for v in r.variants if v.name == REFERENCE), None)
    if ref is None or "onnxruntime" not in ref.latency_ms:
        return ""
    rows = []
    for v in r.variant_rows():
        for rt, per in v.latency_ms.items():
            row = {"Variant": v.name, "Runtime": rt}
            for b in sorted(per, key=batch_key):
                base = ref.latency_ms["onnxruntime"].get(b)
                row[f"b={b} p50 ms"] = f"{per[b].p50:.2f}"
                row[f"b={b} vs {REFERENCE}"] = "—" if base is None else f"{base.p50 / per[b].p50:.2f}x"
            rows.append(row)
    return (f"Against `{REFERENCE}` served by ONNX Runtime, same run (>1: faster than it):\n\n"
            + markdown_table(rows) + "\n")


def stage_notes(res) -> str:
    """What the quantization stages did: bytes, SQNR, and the mixed-precision decisions."""
    keys = ("bits", "block_size", "accuracy_level", "quantized_nodes", "quantized_layers", "weight_bytes_before",
            "weight_bytes_after", "linear_bytes_before", "linear_bytes_after", "weight_sqnr_db_min",
            "output_sqnr_db", "kept_float", "estimated_drop_pts", "measured_drop_pts", "state_bytes_after",
            "file_bytes_after", "max_abs_error")
    lines = []
    for v in res.result.variants:
        for st in v.stages:
            s = st["stats"]
            got = [f"{k} {s[k]:,}" if isinstance(s[k], int) else f"{k} {s[k]:.3g}" if isinstance(s[k], float)
                   else f"{k} {s[k]}" for k in keys if k in s]
            if "sensitivity" in s:
                top = s["sensitivity"]["layers"][:6]
                got.append("most sensitive: " + ", ".join(
                    f"{t['name']} ({t['metric_drop']:+.2f} pt, {t['sqnr_db']} dB, {t['decision']})" for t in top))
            if got:
                lines.append(f"- {v.name} / {st['technique']}: " + "; ".join(got))
    return ("What the stages did:\n\n" + "\n".join(lines) + "\n") if lines else ""


def _median_ms(fn, reps):
    with torch.inference_mode():
        for _ in range(3):
            fn()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def kernels(reps: int) -> str:
    """One Linear layer per MiniLM shape: what each weight-only execution path costs here."""
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    from slimcart.models.weight_only_linear import WeightOnlyLinear

    rows = []
    for k, n in ((384, 384), (384, 1536), (1536, 384)):
        lin = torch.nn.Linear(k, n).eval()
        w = lin.weight.detach()
        s8 = w.abs().amax(1) / 127
        q8 = torch.round(w / s8[:, None]).clamp(-127, 127).to(torch.int8)
        q4 = torch.ops.aten._convert_weight_to_int4pack_for_cpu(torch.randint(0, 16, (n, k), dtype=torch.int32), 1)
        sz4 = torch.rand(k // 32, n, 2)
        dyn = quantize_dynamic(torch.nn.Sequential(lin), {"0": per_channel_dynamic_qconfig}, dtype=torch.qint8)
        paths = {"float32 F.linear": lambda x: lin(x),
                 "weight_only int8 (dequantize + F.linear)": WeightOnlyLinear.from_linear(lin, 8, 128),
                 "weight_only int4 (dequantize + F.linear)": WeightOnlyLinear.from_linear(lin, 4, 32),
                 "aten._weight_int8pack_mm": lambda x: torch.ops.aten._weight_int8pack_mm(x, q8, s8),
                 "aten._weight_int4pack_mm_for_cpu": lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(x, q4, 32, sz4),
                 "dynamic int8 (quantize_dynamic)": dyn}
        for m in (16, 512):
            x = torch.randn(m, k)
            base = None
            for name, fn in paths.items():
                ms = _median_ms(lambda: fn(x), reps)
                base = base or ms
                rows.append({"K x N": f"{k} x {n}", "tokens": m, "path": name, "median ms": f"{ms:.3f}",
                             "vs float32": f"{base / ms:.2f}x"})
    return ("### Kernels: one Linear of MiniLM's shapes\n\n"
            f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {reps} calls. "
            "16 tokens is about one query, 512 about a batch of 32 short queries.\n\n" + markdown_table(rows) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results/weight_only.md", type=Path)
    ap.add_argument("--runs", default="runs/bench", type=Path)
    ap.add_argument("--only", choices=["kernels", "intent", "half"], default=None)
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: 30 rounds x 1 call, 256 scored rows, 128 rows per sensitivity point")
    args = ap.parse_args()
    quick = dict(rounds=30, calls_per_block=1, eval_limit=256, deployed=False, throughput_seconds=0,
                 memory=False) if args.quick else {}
    limit = 128 if args.quick else 1000
    sections = []
    if args.only in (None, "kernels"):
        sections.append(kernels(5 if args.quick else 50))
    if args.only in (None, "intent"):
        text, res = run_section("intent", "banking77", intent_recipes(limit), args.runs, "weight-only",
                                measure=MeasureConfig(**TEXT, **quick))
        sections.append(text + "\n" + vs_reference(res) + "\n" + stage_notes(res))
    native = hardware.has_cpu_feature(*hardware.BF16_FEATURES)
    if args.only in (None, "half") and not native:
        sections.append(HALF_ELSEWHERE)
    if args.only in (None, "half") and native:
        for task, dataset, measure in (("product_image", "fashion-mnist", IMAGE), ("intent", "banking77", TEXT)):
            text, res = run_section(task, dataset, half_torch(), args.runs, "half-torch",
                                    measure=MeasureConfig(**{**measure, "runtimes": ["torch"]}, **quick))
            sections.append(text + "\n" + stage_notes(res))
            text, res = run_section(task, dataset, half_onnx(), args.runs, "half-onnx",
                                    measure=MeasureConfig(**{**measure, "runtimes": ["onnxruntime"]}, **quick))
            sections.append(text + "\n" + stage_notes(res))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("## Weight-only INT8/INT4, mixed-precision INT8 and half precision\n\n"
                        + ("_Smoke run (--quick): timings are not meaningful._\n\n" if args.quick else "")
                        + "\n".join(sections))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
