"""Distillation of the CTR model: a DeepFM student with 4x smaller embedding dims trained from the
DeepFM teacher, with no distillation (labels only), pointwise soft labels, and pointwise + pairwise
ranking distillation, side by side; on women's reviews, on a synthetic log with 1M-row tables and
on a synthetic log of 1M rows.

Writes benchmarks/results/distill_ctr.md. Run from the repository root."""
from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from common import baseline, markdown_table  # noqa: E402

DATASETS = ["womens-reviews", "synthetic:rows=300000,fields=3,vocab=1000000",
            "synthetic:rows=1000000,fields=8,vocab=100000"]
QUICK = ["womens-reviews", "synthetic:rows=20000,fields=3,vocab=50000"]
STACKED = "ctr/distill-dim4-int4-rows"
MODES = {"labels only": dict(alpha=1.0),
         "pointwise": dict(alpha=0.5),
         "pointwise + pairwise": dict(alpha=0.5, ranking_loss=1.0)}


def section(dataset: str, shrink: int, seeds: list[int]) -> str:
    import numpy as np

    import slimcart as sc
    from slimcart import artifact
    from slimcart import registry
    from slimcart.distill.technique import DistillConfig, distill
    from slimcart.quantize.embedding_quant import embedding_bytes
    from slimcart.recipe import Recipe, shipped_recipes, technique_name
    from slimcart.stage import ModelState, StageContext

    then = Recipe.load(shipped_recipes()[STACKED]).stages[1:]   # the stacked recipe after its distill stage

    task = sc.load_task("ctr", dataset)
    teacher = baseline(task)
    spec = teacher.slimcart_spec
    dim = spec["config"]["embed_dim"]
    epochs = task.train_config("full").epochs
    t_auc = task.evaluate(teacher, "test")["auc"]
    t_emb = embedding_bytes(teacher)
    rows = []

    def saved_bytes(state, folder) -> int:
        return artifact.size_bytes(artifact.save(state, folder, task={"name": "ctr"}, input_names=task.input_names,
                                                 examples=task.example_inputs(2, "val")))

    with tempfile.TemporaryDirectory() as tmp:
        t_bytes = saved_bytes(ModelState.from_module(teacher, spec), Path(tmp) / "t")
        for mode, extra in [*MODES.items(), (f"pointwise + pairwise, then int4 rows ({STACKED})", None)]:
            stacked = extra is None
            extra = MODES["pointwise + pairwise"] if stacked else extra
            aucs, t0 = [], time.time()
            for seed in seeds:
                cfg = DistillConfig(student={"embed_dim": max(1, dim // shrink)}, epochs=epochs, temperature=1.0,
                                    seed=seed, **extra)
                state = ModelState.from_module(copy.deepcopy(teacher), spec)
                distill(state, cfg, StageContext(task, Path(tmp), progress=False))
                for i, stage in enumerate(then if stacked else []):
                    registry.get(technique_name(stage)).apply(state, stage, StageContext(task, Path(tmp), i + 1, False))
                aucs.append(task.evaluate(state.torch_model, "test")["auc"])
            s_bytes = saved_bytes(state, Path(tmp) / f"student{len(rows)}")
            mean = float(np.mean(aucs))
            rows.append({"student training": mode, "embed dim": f"{dim} -> {max(1, dim // shrink)}",
                         "test AUC (mean)": f"{mean:.4f}",
                         "per seed": ", ".join(f"{a:.4f}" for a in aucs),
                         "Δ AUC vs teacher": f"{mean - t_auc:+.4f}",
                         "embedding bytes": f"{embedding_bytes(state.torch_model):,} "
                                            f"({t_emb / embedding_bytes(state.torch_model):.1f}x smaller)",
                         "MB": f"{s_bytes / 1e6:.2f}",
                         "smaller": f"{t_bytes / s_bytes:.1f}x", "train s": f"{(time.time() - t0) / len(seeds):.0f}"})
            print(rows[-1], flush=True)
    ctr = f" (planted ceiling {task.info['ceiling_auc']:.4f})" if "ceiling_auc" in task.info else ""
    return (f"### ctr / {dataset}\n\nTeacher: DeepFM, embed dim {dim}, test AUC {t_auc:.4f}{ctr}, "
            f"{t_bytes / 1e6:.2f} MB ({t_emb:,} bytes of embedding tables); {task.describe()['rows']['train']:,} training rows. Students: the same "
            f"MLP, {epochs:g} epochs, the task's optimizer; seeds {seeds}.\n\n" + markdown_table(rows) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="benchmarks/results/distill_ctr.md", type=Path)
    ap.add_argument("--quick", action="store_true", help="smoke run on a small synthetic log")
    ap.add_argument("--only", default=None, help="run this one dataset and write its section alone")
    ap.add_argument("--seeds", default="0,1,2", help="student seeds on women's reviews")
    ap.add_argument("--synthetic-seeds", default="0", help="student seeds on the synthetic log")
    args = ap.parse_args()
    t0 = time.time()
    seeds = [int(s) for s in args.seeds.split(",")]
    synthetic = [int(s) for s in args.synthetic_seeds.split(",")]
    names = [args.only] if args.only else (QUICK if args.quick else DATASETS)
    parts = [section(d, 4, synthetic if d.startswith("synthetic") else seeds) for d in names]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("## Distillation: CTR students with 4x smaller embeddings\n\n"
                        "Pointwise: BCE to the teacher's probability; pairwise: for every pair of rows in a "
                        "batch, the student's sigmoid of the score difference is fitted to the teacher's "
                        "(its order and its confidence in it). alpha 0.5 for both, temperature 1.\n\n"
                        + "\n".join(parts) + f"\n_Total run time: {time.time() - t0:.0f} s._\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
