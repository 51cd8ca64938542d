"""Vocabulary pruning on the intent model (banking77): what the tokens the training data never uses
cost, by fallback. The word-embedding table keeps the rows of the tokens seen in training; a test
token outside them reads [UNK]'s row (``fallback: unk``), the mean of the dropped rows (``mean``), or
the kept row closest to its own by cosine (``nearest``). Scored on the test split in PyTorch, on the
fine-tuned teacher and on a 2-layer student distilled from it (as in ``intent/distill2-heads-int8``'s
first stage), so only the table changes between rows of a model.

    python benchmarks/vocab_fallback.py      # writes benchmarks/results/vocab_fallback.md
"""
from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from common import baseline, markdown_table  # noqa: E402

import slimcart as sc  # noqa: E402
from slimcart.recipe import resolve  # noqa: E402
from slimcart.stage import ModelState, StageContext  # noqa: E402


def rows_for(name: str, model, task) -> list[dict]:
    from slimcart.prune.vocab import VocabPruneConfig, vocab_prune

    m = task.primary_metric
    full = task.evaluate(model, "test")[m]
    rows = [{"model": name, "word embeddings": "all 30,522 rows", f"test {m}": f"{full:.4f}", "Δ (pts)": "—",
             "table MB": "—", "test positions remapped": "0"}]
    for fallback in ("unk", "mean", "nearest"):
        state = ModelState.from_module(copy.deepcopy(model), model.slimcart_spec)
        with tempfile.TemporaryDirectory() as tmp:
            rep = vocab_prune(state, VocabPruneConfig(fallback=fallback), StageContext(task, Path(tmp), progress=False))
        score = task.evaluate(state.torch_model, "test")[m]
        ids, mask = task.splits["test"].inputs
        kept = state.torch_model.encoder.embeddings.word_embeddings
        seen = ids[mask.bool()]
        original = (kept.id_map[seen].long() != 0) if fallback != "nearest" else None
        rows.append({"model": name, "word embeddings": f"{rep.stats['tokens_kept']:,} kept, fallback: {fallback}",
                     f"test {m}": f"{score:.4f}", "Δ (pts)": f"{(score - full) * 100:+.2f}",
                     "table MB": f"{rep.stats['bytes_after'] / 1e6:.2f} (from {rep.stats['bytes_before'] / 1e6:.2f})",
                     "test positions remapped": "—" if original is None else f"{1 - original.float().mean().item():.2%}"})
    return rows


def student_rows(task, teacher) -> list[dict]:
    """The rows of the 2-layer student that ``intent/distill2-heads-int8``'s distill stage trains."""
    from slimcart.distill.technique import distill

    stage = resolve("intent/distill2-heads-int8").stages[0]
    state = ModelState.from_module(copy.deepcopy(teacher), teacher.slimcart_spec)
    with tempfile.TemporaryDirectory() as tmp:
        distill(state, stage, StageContext(task, Path(tmp), progress=False))
    student = state.torch_model
    student.slimcart_spec = state.spec
    return rows_for("2-layer student", student, task)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="benchmarks/results/vocab_fallback.md", type=Path)
    ap.add_argument("--no-student", action="store_true", help="the teacher's rows only (skips ~10 min of training)")
    args = ap.parse_args()
    t0 = time.time()
    task = sc.load_task("intent", "banking77")
    teacher = baseline(task)
    rows = rows_for("teacher (6 layers)", teacher, task)
    if not args.no_student:
        rows += student_rows(task, teacher)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("## Vocabulary pruning: the fallback for tokens training never saw\n\n"
                        "Word embeddings kept for the tokens of banking77's training split (min_count 1, special "
                        "tokens kept); every other token id reads the fallback. Test split, PyTorch, float32. "
                        "`benchmarks/vocab_fallback.py`" + (" --no-student" if args.no_student else "") + ".\n\n"
                        + markdown_table(rows) + f"\n\n_Run time: {time.time() - t0:.0f} s._\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
