"""Distillation on the intent model (banking77): the stacked recipes against the fp32 teacher in
PyTorch eager and against `intent/onnx-int8` (ONNX Runtime's own dynamic INT8 on the teacher), all
timed in one run; then 1-, 2- and 3-layer students trained with and without the teacher, to show
what distillation adds.

Writes benchmarks/results/distill_intent.md. Run from the repository root."""
from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from common import baseline, markdown_table, run_section  # noqa: E402

from slimcart.recipe import MeasureConfig  # noqa: E402

RECIPES = ["intent/onnx-int8", "intent/distill2-heads-int8", "intent/distill3-heads-int8"]
REFERENCE = "onnx-int8"


def headline(res) -> str:
    r = res.result
    base, m = r.baseline, r.primary_metric
    by = {v.name: v for v in r.variants}
    eager = base.latency_ms["torch"]
    ref = by[REFERENCE].latency_ms["onnxruntime"]
    rows = []
    for v in r.variants:
        lat = v.latency_ms.get("onnxruntime")
        if lat is None:
            continue
        mb = v.size_bytes_served.get("onnxruntime", v.size_bytes)
        rows.append({"Variant": v.name, "served MB": f"{mb / 1e6:.2f}",
                     "smaller than fp32": f"{base.size_bytes / mb:.1f}x",
                     m: f"{v.metrics[m]:.4f}", f"Δ {m} (pts)": f"{(v.metrics[m] - base.metrics[m]) * 100:+.2f}",
                     **{f"ORT p50 ms b={b}": f"{lat[b].p50:.2f}" for b in ("1", "32")},
                     **{f"x vs fp32 eager b={b}": f"{eager[b].p50 / lat[b].p50:.1f}x" for b in ("1", "32")},
                     **{f"x vs {REFERENCE} b={b}": f"{ref[b].p50 / lat[b].p50:.2f}x" for b in ("1", "32")},
                     "speed gate": v.gate.get("verdict", "—")})
    return (f"Teacher: fp32 MiniLM-L6 in PyTorch eager, {base.size_bytes / 1e6:.2f} MB, {m} "
            f"{base.metrics[m]:.4f}, p50 {eager['1'].p50:.2f} ms at b=1 and {eager['32'].p50:.2f} ms at b=32. "
            "Every variant is served by ONNX Runtime; ratios are of p50 latencies from the same run "
            "(interleaved rounds).\n\n" + markdown_table(rows) + "\n")


def old_rows(head: str) -> list[dict]:
    """The rows of an earlier "What distillation adds" table in ``head`` (to keep the sizes not rerun)."""
    if "### What distillation adds" not in head:
        return []
    lines = [ln for ln in head.split("### What distillation adds", 1)[1].splitlines() if ln.startswith("|")]
    if len(lines) < 3:
        return []
    keys = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(keys, (c.strip() for c in ln.strip("|").split("|")))) for ln in lines[2:]]


def students(task, teacher, layers, epochs: float, keep: list[dict] | None = None) -> str:
    from slimcart.distill.technique import DistillConfig, distill
    from slimcart.stage import ModelState, StageContext

    rows = []
    m = task.primary_metric
    t_test = task.evaluate(teacher, "test")[m]
    for k in layers:
        for mode in ("distilled", "task loss only"):
            kd = mode == "distilled"
            cfg = DistillConfig(student={"layers": k}, epochs=epochs, alpha=0.5 if kd else 1.0, temperature=2.0,
                                hidden_loss=1.0 if kd else 0.0, attention_loss=1.0 if kd else 0.0,
                                freeze_embeddings=True)
            state = ModelState.from_module(copy.deepcopy(teacher), teacher.slimcart_spec)
            t0 = time.time()
            with tempfile.TemporaryDirectory() as tmp:
                rep = distill(state, cfg, StageContext(task, Path(tmp), progress=False))
            test = task.evaluate(state.torch_model, "test")[m]
            rows.append({"layers": k, "training": mode, f"val {m}": f"{rep.stats['student_val'][m]:.4f}",
                         f"test {m}": f"{test:.4f}", "Δ vs teacher (pts)": f"{(test - t_test) * 100:+.2f}",
                         "parameters": f"{rep.stats['params_student']:,}", "train s": f"{time.time() - t0:.0f}"})
            print(rows[-1], flush=True)
    rows += [r for r in keep or [] if int(r["layers"]) not in layers]
    rows.sort(key=lambda r: (int(r["layers"]), r["training"] != "distilled"))
    return (f"Students initialised from the teacher's layers (evenly spaced, ending with the last), word "
            f"embeddings frozen, {epochs:g} epochs each; 'distilled': alpha 0.5, T 2, hidden-state MSE and "
            f"MiniLM attention relations; 'task loss only': the same student and budget with the labels "
            f"alone. Teacher test {m}: {t_test:.4f}.\n\n" + markdown_table(rows) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="benchmarks/results/distill_intent.md", type=Path)
    ap.add_argument("--runs", default="runs/bench", type=Path)
    ap.add_argument("--layers", default="1,2,3", help=(
        "student sizes of the with/without table ('': not rerun; the table of an existing --out is kept)"))
    ap.add_argument("--epochs", default=4.0, type=float)
    import slimcart as sc

    ap.add_argument("--table-only", action="store_true",
                    help="(re)measure the students of --layers in the existing --out's table, keeping its other rows")
    args = ap.parse_args()
    t0 = time.time()
    keep = []
    if args.table_only:
        head, text = args.out.read_text().split("### intent / banking77", 1)
        text = "### intent / banking77" + text.split("\n_Total run time:")[0].rstrip() + "\n"
        keep = old_rows(head)
        head = head.split("### What distillation adds", 1)[0]
    else:
        old = args.out.read_text() if args.out.is_file() else ""
        table = ""
        if not args.layers and "### What distillation adds" in old:
            table = "### What distillation adds" + old.split("### What distillation adds", 1)[1].split("### intent / banking77")[0]
        measure = MeasureConfig(batch_sizes=[1, 32], runtimes=["torch", "onnxruntime"], deployed=False,
                                memory=False, throughput_seconds=0)
        text, res = run_section("intent", "banking77", RECIPES, args.runs, "distill", measure=measure)
        head = ("## Distillation: the intent model (banking77), stacked with pruning and int8\n\n" + headline(res) + "\n")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(head + table + text + f"\n_Total run time: {time.time() - t0:.0f} s._\n")
    if args.layers:
        task = sc.load_task("intent", "banking77")
        table = students(task, baseline(task), [int(k) for k in args.layers.split(",")], args.epochs, keep)
        args.out.write_text(head + "### What distillation adds\n\n" + table + "\n" + text
                            + f"\n_Total run time: {time.time() - t0:.0f} s._\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
