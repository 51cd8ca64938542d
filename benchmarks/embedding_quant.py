"""Row-wise quantized embedding tables: bytes, AUC and latency for each `embedding_quant` setting.

Per dataset, the float DeepFM baseline is trained once and cached under runs/bench/models; each
setting is applied to a copy. Per variant: embedding bytes (every table, id maps included) and
their ratio to float; bytes of the saved artifact and of the exported ONNX file; test AUC and its
change; the SQNR of the looked-up vectors on the test ids; the ONNX graph's largest output
difference from eager; p50 latencies, all timed
interleaved in one process, of the table lookups alone (every table of the model for a batch of
ids) and of the whole model, at batch 1 and 256, in PyTorch eager and ONNX Runtime, with the
ratio to float in the same run. A last table times ONNX Runtime's GatherBlockQuantized contrib op
against the exported plain-op graph on the same int4 codes (second-order tables only).

    python benchmarks/embedding_quant.py            # writes benchmarks/results/embedding_quant.md
    python benchmarks/embedding_quant.py --quick    # small synthetic table, few rounds (a check;
                                                    # writes runs/bench/embedding_quant-quick.md)
    python benchmarks/embedding_quant.py --intent   # also banking77: word embeddings int4 (+ int8 MatMul)
"""
from __future__ import annotations

import argparse
import copy
import datetime as dt
import math
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

import slimcart as sc
from slimcart import artifact, registry
from slimcart.accelerate.onnx_export import export_onnx, parity
from slimcart.measure import latency
from slimcart.measure.runners import OrtRunner, TorchRunner
from slimcart.measure.stats import fmt_speedup, speedup
from slimcart.models.quant_embedding import QuantEmbedding
from slimcart.quantize.embedding_quant import embedding_bytes
from slimcart.stage import ModelState, StageContext

from common import baseline, markdown_table, run_section

SYNTHETIC = "synthetic:rows=600000,fields=3,vocab=1000000"
QUICK_SYNTHETIC = "synthetic:rows=20000,fields=3,vocab=50000"
BATCHES = (1, 256)


def eq(**kw) -> tuple[str, dict]:
    return ("embedding_quant", kw)


SETTINGS: dict[str, list[tuple[str, dict]]] = {
    "fp32": [],
    "int8, fp16 scale+bias": [eq(bits=8)],
    "int4, fp32 scale+bias": [eq(bits=4, scale_dtype="float32")],
    "int4, fp16 scale+bias": [eq(bits=4)],
    "int4, fp16, minmax": [eq(bits=4, search="minmax")],
    "int4, log8 scale": [eq(bits=4, scale_dtype="log8")],
    "int2, fp16 scale+bias": [eq(bits=2)],
    "int2, log8 scale": [eq(bits=2, scale_dtype="log8")],
    "int2 + hot 5% int8, fp16": [eq(bits=2, hot_fraction=0.05)],
    "int2 + hot 10% int8, fp16": [eq(bits=2, hot_fraction=0.10)],
    "int2 + hot 5% int8, log8": [eq(bits=2, scale_dtype="log8", hot_fraction=0.05)],
    "rows min_count=2 + int4 log8": [("embedding_row_prune", {"min_count": 2}),
                                     eq(bits=4, scale_dtype="log8")],
}


class Lookup(nn.Module):
    """Every embedding table of a DeepFM for a batch of ids: [batch, sum of table widths]."""

    def __init__(self, model: nn.Module, second_order_only: bool = False):
        super().__init__()
        self.tables = nn.ModuleList(list(model.embeddings) + ([] if second_order_only else list(model.linear_embeddings)))
        self.fields = len(model.embeddings)

    def forward(self, sparse: torch.Tensor) -> torch.Tensor:
        return torch.cat([t(sparse[:, i % self.fields]) for i, t in enumerate(self.tables)], 1)


def gbq_graph(model: nn.Module, path: Path) -> Path | None:
    """The second-order lookups of ``model`` (float-scale int4 QuantEmbedding tables) with
    com.microsoft.GatherBlockQuantized: ``(q - 8) * scale``, then + ``bias + 8 * scale``."""
    nodes, inits, outs = [], [], []
    for i, t in enumerate(model.embeddings):
        if not (isinstance(t, QuantEmbedding) and t.bits == 4 and t.scale_dtype != "log8" and not t.hot_rows
                and t.num_ids is None and t.dim % 16 == 0):
            return None
        scale = t.scale.float().numpy()[:, None].repeat(t.dim // 16, 1)
        inits += [numpy_helper.from_array(t.codes.numpy(), f"codes{i}"), numpy_helper.from_array(scale, f"scale{i}"),
                  numpy_helper.from_array((t.bias.float() + 8 * t.scale.float()).numpy()[:, None], f"bias{i}"),
                  numpy_helper.from_array(np.array([i], dtype=np.int64), f"col{i}")]
        nodes += [helper.make_node("Gather", ["sparse", f"col{i}"], [f"ids{i}"], axis=1),
                  helper.make_node("Squeeze", [f"ids{i}", f"col_axis"], [f"id{i}"]),
                  helper.make_node("GatherBlockQuantized", [f"codes{i}", f"id{i}", f"scale{i}"], [f"q{i}"],
                                   domain="com.microsoft", bits=4, block_size=16, gather_axis=0, quantize_axis=1),
                  helper.make_node("Gather", [f"bias{i}", f"id{i}"], [f"b{i}"], axis=0),
                  helper.make_node("Add", [f"q{i}", f"b{i}"], [f"v{i}"])]
        outs.append(f"v{i}")
    inits.append(numpy_helper.from_array(np.array([1], dtype=np.int64), "col_axis"))
    nodes.append(helper.make_node("Concat", outs, ["out"], axis=1))
    graph = helper.make_graph(nodes, "gbq", [helper.make_tensor_value_info("sparse", TensorProto.INT64, ["b", None])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                      helper.make_opsetid("com.microsoft", 1)]), str(path))
    return path


def fmt_ms(ms: float) -> str:
    return f"{ms:.3f}" if ms < 1 else f"{ms:.2f}"


def run_dataset(dataset: str, tmp: Path, quick: bool, threads: int) -> list[str]:
    t0 = time.time()
    task = sc.load_task("ctr", dataset)
    if dataset.startswith("synthetic"):
        model = baseline(task, "demo" if quick else "full")
    else:
        model = baseline(task, "full")
    tmp = tmp / "".join(c if c.isalnum() else "_" for c in dataset)
    tmp.mkdir()
    spec, names = model.slimcart_spec, task.input_names
    x_parity = task.example_inputs(256)
    rows, cases, extra = [], {}, {}
    test_ids = task.splits["test"].inputs[0]
    with torch.inference_mode():
        ref = Lookup(model)(test_ids).double()
    for label, stages in SETTINGS.items():
        state = ModelState.from_module(copy.deepcopy(model), spec)
        for i, (tech, kw) in enumerate(stages):
            t = registry.get(tech)
            t.apply(state, t.config_cls(**kw), StageContext(task, tmp, i, progress=False))
        m = state.torch_model.eval()
        folder = artifact.save(state, tmp / f"a{len(rows)}", task={"name": "ctr", "dataset": dataset},
                               examples=task.example_inputs(8), input_names=names)
        onnx_path = export_onnx(m, task.example_inputs(2), tmp / f"m{len(rows)}.onnx", names, task.dynamic_axes())
        look = Lookup(m).eval()
        look_path = export_onnx(look, (x_parity[0][:2],), tmp / f"l{len(rows)}.onnx", ("sparse",),
                                {"sparse": {0: "batch"}, "logits": {0: "batch"}})
        with torch.inference_mode():
            noise = (look(test_ids).double() - ref).pow(2).sum()
        rows.append({"label": label, "sqnr": 10 * math.log10(ref.pow(2).sum() / noise) if noise > 0 else math.inf,
                     "emb": embedding_bytes(m), "file": artifact.size_bytes(folder),
                     "onnx": onnx_path.stat().st_size, "auc": task.evaluate(m, "test")["auc"],
                     "err": parity(m, onnx_path, x_parity, names)["max_abs_error"]})
        for b in BATCHES:
            x = task.example_inputs(b)
            cases[(label, "model", "torch", b)] = (TorchRunner(m, threads=threads), x, b)
            cases[(label, "model", "onnxruntime", b)] = (OrtRunner(onnx_path, names, threads), x, b)
            cases[(label, "lookup", "torch", b)] = (TorchRunner(look, threads=threads), (x[0],), b)
            cases[(label, "lookup", "onnxruntime", b)] = (OrtRunner(look_path, ("sparse",), threads), (x[0],), b)
        if label in ("fp32", "int4, fp32 scale+bias"):  # plain ops vs GatherBlockQuantized, second-order tables
            second = Lookup(m, second_order_only=True).eval()
            plain = export_onnx(second, (x_parity[0][:2],), tmp / f"s{len(rows)}.onnx", ("sparse",),
                                {"sparse": {0: "batch"}, "logits": {0: "batch"}})
            extra[(label, "plain ops")] = plain
            gbq = gbq_graph(m, tmp / f"g{len(rows)}.onnx") if label != "fp32" else None
            if gbq is not None:
                got = OrtRunner(gbq, ("sparse",), threads)((x_parity[0],))
                extra["gbq_err"] = float(np.abs(got - second(x_parity[0]).detach().numpy()).max())
                extra[(label, "GatherBlockQuantized")] = gbq
    for (label, kind), path in [(k, v) for k, v in extra.items() if isinstance(k, tuple)]:
        for b in BATCHES:
            x = task.example_inputs(b)
            cases[(label, kind, "gbq-table", b)] = (OrtRunner(path, ("sparse",), threads), (x[0],), b)
    rounds, block = (3, 2) if quick else (20, 5)
    timings = latency.interleaved(cases, rounds=rounds, warmup=2, calls_per_block=block, progress=False)
    p50 = {k: t.summary()["p50"] for k, t in timings.items()}
    base = rows[0]
    info = (f"vocab sizes {task.info['vocab_sizes']}, {len(task.splits['train']):,} training rows, "
            f"embed_dim {spec['config']['embed_dim']}; baseline test AUC {base['auc']:.4f}"
            + (f" (planted ceiling {task.info['ceiling_auc']:.4f})" if "ceiling_auc" in task.info else "")
            + f"; {rounds} rounds x {block} timed calls per cell, interleaved.")
    sizes = [{"setting": r["label"], "embedding bytes": f"{r['emb']:,}", "ratio": f"{base['emb'] / r['emb']:.2f}x",
              "artifact bytes": f"{r['file']:,}", "ONNX bytes": f"{r['onnx']:,}",
              "ONNX ratio": f"{base['onnx'] / r['onnx']:.2f}x", "test AUC": f"{r['auc']:.4f}",
              "delta AUC": f"{r['auc'] - base['auc']:+.4f}", "lookup SQNR dB": f"{r['sqnr']:.1f}",
              "ORT max abs diff": f"{r['err']:.1e}"} for r in rows]
    speed = []
    for r in rows:
        row = {"setting": r["label"]}
        for kind in ("lookup", "model"):
            for rt in ("torch", "onnxruntime"):
                for b in BATCHES:
                    key, ref = (r["label"], kind, rt, b), ("fp32", kind, rt, b)
                    sp = "baseline" if key == ref else fmt_speedup(speedup(timings[ref], timings[key]))
                    row[f"{kind} {rt} b={b} ms"] = f"{fmt_ms(p50[key])} ({sp})"
        speed.append(row)
    kernels = [{"graph": f"{label}: {kind}", **{f"b={b} p50 ms": fmt_ms(p50[(label, kind, 'gbq-table', b)])
                                                for b in BATCHES}}
               for (label, kind) in [k for k in extra if isinstance(k, tuple)]]
    lines = [f"### {dataset}", "", info, "", "Sizes and accuracy:", "", markdown_table(sizes), "",
             "p50 latency in ms (speedup against fp32 in the same runtime and run, with its paired 95% "
             "interval: below 1.0 is slower; lookup = every table for a batch of ids):", "",
             markdown_table(speed), ""]
    if "gbq_err" in extra:
        lines += ["ONNX Runtime, second-order tables only: the exported plain-op graph vs "
                  f"com.microsoft.GatherBlockQuantized on the same int4 codes (max abs diff {extra['gbq_err']:.1e}):",
                  "", markdown_table(kernels), ""]
    lines += [f"({time.time() - t0:.0f} s for this dataset)", ""]
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None)
    ap.add_argument("--quick", action="store_true", default=bool(os.environ.get("SLIMCART_BENCH_QUICK")),
                    help="small synthetic dataset and few timing rounds (env SLIMCART_BENCH_QUICK=1)")
    ap.add_argument("--only", default=None, help="run one dataset (a prefix of its name)")
    ap.add_argument("--intent", action="store_true", help="also banking77 through compress (takes ~15 min)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out or ("runs/bench/embedding_quant-quick.md" if args.quick
                            else Path(__file__).parent / "results" / "embedding_quant.md"))
    lines = ["## Row-wise quantized embedding tables", "",
             f"{dt.date.today()}, torch {torch.__version__}, {args.threads} threads, {platform.machine()}. "
             "Embedding bytes count every table of the model (id maps of row-pruned tables included); "
             "fp16/fp32 scale+bias: asymmetric codes with a scale and bias per row; log8: symmetric codes "
             "with one byte per row indexing 255 log-spaced scales; 1-wide (first-order) tables have one "
             "scale and bias per table. Hot rows: the rows read most often on the training split. "
             "Lookup SQNR: the looked-up vectors of every table for the test split's ids against the "
             "float tables' (so it weighs rows by how often they are read). ONNX bytes: the initializers "
             "shrink by the embedding bytes (log8 adds its 1 KB grid of 256 scales per table); the file "
             "also holds ~3 KB of unpacking nodes per table.", ""]
    datasets = [d for d in ["womens-reviews", QUICK_SYNTHETIC if args.quick else SYNTHETIC]
                if not args.only or d.startswith(args.only)]
    with tempfile.TemporaryDirectory() as tmp:
        for dataset in datasets:
            section = run_dataset(dataset, Path(tmp), args.quick, args.threads)
            print("\n".join(section), flush=True)
            lines += section
    if args.intent:
        int4 = {"name": "int4-embeddings", "description": "word embeddings row-wise int4", "version": 1,
                "stages": [{"type": "embedding_quant", "bits": 4, "tables": ["*word_embeddings"]}]}
        text, _ = run_section("intent", "banking77", [int4, "intent/onnx-int8", "intent/int4-embeddings-onnx-int8"],
                              Path("runs/bench"), title="embedding-quant")
        lines += [text]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
