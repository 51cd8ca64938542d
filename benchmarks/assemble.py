"""Join benchmarks/results/*.md into BENCHMARKS.md with a header on how to read them."""
from __future__ import annotations

import datetime as dt
from pathlib import Path

from slimcart.pipeline import environment

ORDER = ["main.md", "pruning-product_image.md", "pruning-intent.md", "pruning-ctr.md", "embedding_rows.md", "ctr_baseline.md", "ctr_dlrm.md", "ctr_scale.md",
         "graph_opt.md", "runtimes.md", "serving.md", "static_int8.md", "int8_cpu_xeon_t2.md", "int8_cpu_xeon_t8.md", "quant_intent.md", "weight_only.md",
         "embedding_quant.md", "deep_compression.md", "distill_intent.md", "vocab_fallback.md", "distill_ctr.md", "distill_images.md", "distill_images_feat.md", "distill_images_r144.md", "distill_images_screen.md", "train_layout.md",
         "gpu.md"]
HEADINGS = {"pruning-": "## Pruning: structured, gradual, N:M\n"}  # before the first file of a group


def main() -> None:
    res = Path(__file__).parent / "results"
    env = environment()
    parts = [
        "# Benchmarks\n",
        f"Assembled on {dt.date.today()} from `benchmarks/results/` ({env['cpu']}, {env['machine']}, "
        f"CPU features {', '.join(env['cpu_features'])}, torch {env['torch']}, onnxruntime {env['onnxruntime']}). Rerun: `python benchmarks/run.py`, "
        "`python benchmarks/pruning.py`, `python benchmarks/embedding_rows.py`, `python benchmarks/graph_opt.py`, "
        "`python benchmarks/runtimes.py`, `python benchmarks/serving.py`, `python benchmarks/static_int8.py`, "
        "`python benchmarks/quant_intent.py`, `python benchmarks/weight_only.py`, `python benchmarks/embedding_quant.py`, "
        "`python benchmarks/deep_compression.py`, `python benchmarks/distill_intent.py`, `python benchmarks/vocab_fallback.py`, `python benchmarks/distill_ctr.py`, "
        "`python benchmarks/distill_images.py` and `python benchmarks/distill_images_screen.py` (need the Grocery Store photos), `python benchmarks/train_layout.py`, `python benchmarks/ctr_scale.py`, then "
        "`python benchmarks/assemble.py` (or `make bench`).\n",
        "How to read: every cell is measured, never estimated. Size is the bytes of the saved artifact "
        "(weights file + JSON spec); `Served MB` is, per runtime, the artifact that runtime serves (a "
        "PyTorch variant timed in ONNX Runtime is exported, and that ONNX file is saved and counted). "
        "Latency is p50 per batch in ms; the number in brackets is the speedup against the baseline in "
        "the same runtime, timed in the same process with all variants interleaved in rounds (a fresh "
        "random order each round, the same number of back-to-back timed calls per case per round, ONNX "
        "Runtime without spinning). `(=)` marks no measured difference: the speedup's paired-bootstrap "
        "95% interval includes 1.0, or the difference is under 3%. `as deployed` is each runtime timed "
        "alone with its default options. Throughput is samples per second over 1 s of back-to-back "
        "calls. This machine drifts 20-30% between runs: compare ratios within a section, not absolute "
        "ms across sections. Eager PyTorch on 2 threads is far more sensitive to other load than ONNX Runtime "
        "(a concurrent job once made its interleaved latencies up to 180x slower): time with nothing else running. Metric deltas are in points (x100) against the baseline on the same test "
        "rows; variants were scored on validation first (val metrics are in each report). `—` means "
        "the runtime cannot serve that artifact (each report's notes say why).\n",
        "Timing inputs are the first rows of the validation split (a session looks at nothing of the "
        "test split before variants are chosen). For banking77 a batch of 32 is padded to 55 tokens "
        "(tables before this version timed test rows padded to 24), which is most of why its batch-32 "
        "latencies are ~3x the earlier ones.\n",
        "The 2-core machines these sections ran on were not all the same CPU: the sections dated "
        "2026-12-03 (quant_intent, deep_compression, distill_*, the ctr sections) ran on an Intel Xeon with AVX-512 VNNI "
        "and AMX-INT8, where ONNX Runtime's int8 matmuls are 4x its fp32 ones; earlier sections ran on "
        "machines whose int8 features each section names where they matter (static_int8: AVX2 only, "
        "int8 matmuls 1.5x fp32). Compare ratios within a section, never across CPUs.\n",
        "Two kinds of section come from another machine, and say so with its description: "
        "`int8_cpu_xeon_*` (the static INT8 artifacts of this file, rerun on a 16-core Xeon with AVX-512 "
        "VNNI and AMX: `python benchmarks/int8_cpu.py .gpu`) and `gpu.md` (one NVIDIA H200: "
        "`python benchmarks/gpu.py prepare .gpu` here, `python benchmarks/gpu.py run .gpu` there).\n",
        "Caveat found while measuring: two ONNX Runtime sessions of graphs that do the same work (a "
        "magnitude-pruned model is a dense graph with zeros) were measured 5-19% apart on "
        "sub-millisecond calls with two threads, with intervals that exclude 1.0: each session has "
        "its own thread pool, and on 2 cores their scheduling differs. At one thread the same pair "
        "shows no measured difference (a test checks it). Read sub-millisecond ONNX Runtime ratios "
        "near 1 with that in mind.\n",
        "The ctr baseline changed on 2026-12-03 (row-wise Adagrad on sparse table gradients, a "
        "frequency-aware L2 on the rows, early stopping on the val AUC; see \"CTR: a baseline that "
        "learns\"). Every section with ctr numbers was rerun with it that day, except the GPU section, "
        "whose ctr model is the former baseline.\n",
    ]
    names = sorted(p.name for p in res.glob("*.md"))
    for name in sorted(names, key=lambda n: (ORDER.index(n) if n in ORDER else len(ORDER), n)):
        for prefix, heading in HEADINGS.items():
            if name.startswith(prefix) and heading not in parts:
                parts.append(heading)
        parts.append((res / name).read_text())
    Path("BENCHMARKS.md").write_text("\n".join(parts))
    print("wrote BENCHMARKS.md")


if __name__ == "__main__":
    main()
