"""Runtimes compared on the trained baselines: PyTorch eager vs torch.compile (default, freezing,
max-autotune with freezing) vs ONNX Runtime vs OpenVINO, at batch 1 and a large batch, timed
interleaved in one process per task. Compile and session-build time is reported apart from the
steady-state latency, with the outputs' max difference from eager PyTorch.

    python benchmarks/runtimes.py                        # all three tasks (compiles take minutes)
    python benchmarks/runtimes.py --only ctr             # one task
    python benchmarks/runtimes.py --only ctr --skip torch_compile-max-autotune --eval-limit 256

Writes benchmarks/results/runtimes.md; benchmarks/assemble.py joins it into BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from common import baseline, markdown_table

import slimcart as sc
from slimcart.measure import hardware
from slimcart.measure.session import Session
from slimcart.measure.stats import speedup
from slimcart.pipeline import baseline_state
from slimcart.report.markdown import DASH, fmt_ms, fmt_rate

# max-autotune benchmarks every GEMM shape of MiniLM at each batch size: over half an hour of
# compiling on 2 cores, so it is left out of the intent section (pass --autotune-all to include it)
CASES = [("product_image", "fashion-mnist", [1, 64], []), ("intent", "banking77", [1, 32], ["torch_compile-max-autotune"]),
         ("ctr", "womens-reviews", [1, 64], [])]
RUNTIMES = {
    "torch": "torch",
    "torch_compile": "torch_compile",
    "torch_compile-freezing": {"runtime": "torch_compile", "freezing": True},
    "torch_compile-max-autotune": {"runtime": "torch_compile", "mode": "max-autotune-no-cudagraphs",
                                   "freezing": True},
    "onnxruntime": "onnxruntime",
    "openvino": "openvino",
}


def _choice(label: str):
    spec = RUNTIMES[label]
    return spec if isinstance(spec, str) else {**spec, "label": label}


def section(task_name: str, dataset: str, batch_sizes: list[int], labels: list[str], rounds: int,
            eval_limit: int | None) -> str:
    t0 = time.time()
    task = sc.load_task(task_name, dataset)
    model = baseline(task)
    measure = sc.MeasureConfig(batch_sizes=batch_sizes, runtimes=[_choice(lb) for lb in labels], rounds=rounds,
                               memory=False, deployed=False, throughput_seconds=1.0, eval_limit=eval_limit)
    work = Path(tempfile.mkdtemp(prefix="slimcart-runtimes-"))
    try:
        s = Session(task, measure, work, progress=False)
        s.add("baseline", baseline_state(model, task)[0], baseline=True)
        timings = s.time([])
        rec = s.variant_record(s.baseline, timings)
        s.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rows = []
    for label in labels:
        if label not in rec["latency_ms"]:
            continue
        setup, parity = rec["setup_s"].get(label, {}), rec["served_parity"].get(label)
        row = {"Runtime": label, "Served MB": f"{rec['size_bytes_served'][label] / 1e6:.2f}"}
        for b in map(str, batch_sizes):
            p = rec["latency_ms"][label][b]
            row[f"b={b} p50 ms [95% CI]"] = f"{fmt_ms(p['p50'])} [{fmt_ms(p['p50_low'])}, {fmt_ms(p['p50_high'])}]"
            if label == "torch":
                row[f"b={b} vs eager"] = DASH
            else:
                sp = speedup(timings[("baseline", "torch", int(b))], timings[("baseline", label, int(b))], seed=0)
                row[f"b={b} vs eager"] = f"{sp['x']:.2f}x [{sp['low']:.2f}, {sp['high']:.2f}]" + (
                    " =" if sp["verdict"] == "no measured difference" else "")
            row[f"b={b} samples/s"] = fmt_rate(rec["throughput"][label][b])
            row[f"b={b} first call s"] = f"{setup[b]:.2f}" if b in setup else DASH
        row["build s"] = f"{setup['build']:.2f}" if "build" in setup else DASH
        row["setup total s"] = f"{setup['total']:.1f}" if "total" in setup else DASH
        row["max abs diff vs eager"] = DASH if parity is None else f"{parity['max_abs_diff']:.1e}"
        rows.append(row)
    notes = [n for n in rec["notes"] if not n.startswith("metrics:")]
    text = (f"### {task_name} / {dataset}\n\n"
            f"Baseline {rec['artifact']}, {s.threads} threads, {rounds} rounds x {measure.calls_per_block} timed calls "
            f"per cell, interleaved. `vs eager`: eager p50 / this p50 with its paired 95% interval (`=`: no "
            f"measured difference). `first call s`: the first call at that batch (torch.compile compiles "
            f"there); `setup total s`: building the runner plus every first call, the scoring's shapes "
            f"included. Max abs diff: model outputs against eager PyTorch on validation rows.\n\n"
            + markdown_table(rows) + "\n\n"
            + ("Notes: " + "; ".join(notes) + "\n\n" if notes else "")
            + f"_Section run time: {time.time() - t0:.0f} s._\n")
    print(text, flush=True)
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results/runtimes.md")
    ap.add_argument("--only", default=None, help="a task name to run alone")
    ap.add_argument("--skip", action="append", default=[], choices=list(RUNTIMES)[1:],
                    help="a runtime label to leave out (repeat)")
    ap.add_argument("--batch-sizes", default=None, help="e.g. 1,8 (default: 1 and 32 or 64 per task)")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--autotune-all", action="store_true", help="max-autotune on the intent model too")
    ap.add_argument("--eval-limit", type=int, default=None, help="validation rows scored (default: all)")
    args = ap.parse_args()
    labels = [lb for lb in RUNTIMES if lb not in args.skip]
    sizes = [int(b) for b in args.batch_sizes.split(",")] if args.batch_sizes else None
    sections = [section(t, d, sizes or b, [lb for lb in labels if args.autotune_all or lb not in skip],
                        args.rounds, args.eval_limit)
                for t, d, b, skip in CASES if not args.only or t == args.only]
    head = ("## Runtimes: PyTorch eager, torch.compile, ONNX Runtime, OpenVINO\n\n"
            f"{hardware.summary()}\n\n")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(head + "\n".join(sections))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
