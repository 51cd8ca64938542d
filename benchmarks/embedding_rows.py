"""Embedding-row pruning sweep: how many rows, bytes and AUC points each setting costs.

For each dataset, train the DeepFM baseline once, apply ``embedding_row_prune`` with each
setting to a copy, save it as an artifact, and score it on the test split.

    python benchmarks/embedding_rows.py     # writes benchmarks/results/embedding_rows.md
    python benchmarks/embedding_rows.py --out /tmp/rows.md --only womens-reviews
"""
from __future__ import annotations

import argparse
import copy
import datetime as dt
import itertools
import platform
import tempfile
import time
from pathlib import Path

import torch

import slimcart as sc
from slimcart import artifact
from slimcart.models.compact_embedding import table_bytes
from slimcart.prune.embedding_rows import EmbeddingRowPruneConfig, embedding_row_prune
from slimcart.stage import ModelState, StageContext

from common import baseline

DATASETS = ["womens-reviews", "synthetic:rows=200000,fields=8,vocab=100000"]
SETTINGS = [{"min_count": c} for c in (1, 2, 5, 20)] + \
           [{"keep_ratio": r} for r in (0.5, 0.25, 0.1, 0.05)] + \
           [{"criterion": "norm", "keep_ratio": r} for r in (0.25, 0.1)]


def label(setting: dict) -> str:
    crit = setting.get("criterion", "frequency")
    return f"{crit}, " + ", ".join(f"{k}={v}" for k, v in setting.items() if k != "criterion")


_FOLDERS = itertools.count()


def saved_size(state: ModelState, task, tmp: Path) -> int:
    folder = tmp / f"model{next(_FOLDERS)}"
    artifact.save(state, folder, task={"name": task.name, "dataset": task.dataset},
                  examples=task.example_inputs(8), input_names=task.input_names)
    return artifact.size_bytes(folder)


def run_dataset(dataset: str, tmp: Path, budget: str = "full") -> list[str]:
    t0 = time.time()
    task = sc.load_task("ctr", dataset)
    model = baseline(task, budget)  # trained once, cached for every benchmark script
    spec = model.slimcart_spec
    base_auc = task.evaluate(model, "test")["auc"]
    rows0 = sum(e.num_embeddings for e in model.embeddings)
    bytes0 = table_bytes(model)
    size0 = saved_size(ModelState.from_module(model, spec), task, tmp)
    lines = [f"### {dataset}", "",
             f"vocab sizes {task.info['vocab_sizes']}, {len(task.splits['train'])} training rows, "
             f"embed_dim {spec['config']['embed_dim']}; baseline trained in "
             f"{model.slimcart_training['seconds']} s.", "",
             "| setting | fields pruned | rows kept (%) | embedding bytes | artifact bytes "
             "| train rows remapped (%) | test AUC | delta AUC |",
             "|---|---|---|---|---|---|---|---|",
             f"| baseline | 0 | 100.0 | {bytes0:,} | {size0:,} | 0.0 | {base_auc:.4f} | - |"]
    for setting in SETTINGS:
        state = ModelState.from_module(copy.deepcopy(model), spec)
        report = embedding_row_prune(state, EmbeddingRowPruneConfig(**setting),
                                     StageContext(task, tmp, progress=False))
        s = report.stats
        size = saved_size(state, task, tmp)
        auc = task.evaluate(state.torch_model, "test")["auc"]
        lines.append(f"| {label(setting)} | {s['fields_pruned']}/{len(model.embeddings)} "
                     f"| {100 * s['rows_after'] / rows0:.1f} | {s['embedding_bytes_after']:,} "
                     f"| {size:,} | {100 * s['train_rows_remapped_share']:.1f} | {auc:.4f} "
                     f"| {auc - base_auc:+.4f} |")
    lines += ["", f"({time.time() - t0:.0f} s for this dataset)", ""]
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "embedding_rows.md"))
    ap.add_argument("--only", default=None, help="run one dataset (a prefix of its name)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--budget", default="full", choices=["full", "demo"],
                    help="baseline training budget (demo: one epoch)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lines = ["## Embedding-row pruning", "",
             f"{dt.date.today()}, torch {torch.__version__}, {args.threads} threads, "
             f"{platform.machine()}. Rows kept counts the second-order tables' rows (fallback rows "
             "included); embedding bytes count both tables of every field plus the id maps; "
             "artifact bytes are `artifact.size_bytes` of the saved float model. Train rows "
             "remapped: training rows with at least one id now read from a fallback row. Fields "
             "where the compact tables would not be smaller are left dense.", ""]
    with tempfile.TemporaryDirectory() as tmp:
        for dataset in DATASETS:
            if args.only and not dataset.startswith(args.only):
                continue
            section = run_dataset(dataset, Path(tmp), args.budget)
            print("\n".join(section), flush=True)
            lines += section
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
