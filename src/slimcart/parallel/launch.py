"""Sharded DeepFM training and evaluation, one process per rank, started by torchrun:

    torchrun --nproc-per-node 2 -m slimcart.parallel.launch \\
        --dataset 'synthetic:rows=200000,fields=8,vocab=100000' --epochs 2 --out runs/sharded

    torchrun --nproc-per-node 3 -m slimcart.parallel.launch --evaluate-from runs/sharded/checkpoint \\
        --dataset 'synthetic:rows=200000,fields=8,vocab=100000'

Without torchrun (no RANK in the environment) it runs as a single process (world size 1).
Every rank loads the dataset. --out (and the checkpoint in it) must be on a file system that
every rank can write, and see, for a multi-node run.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any, Sequence

from ..errors import SlimcartError, UsageError

SUMMARY, EVALUATION, CHECKPOINT = "summary.json", "evaluation.json", "checkpoint"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="torchrun --nproc-per-node N -m slimcart.parallel.launch",
        description="Train a DeepFM with its embedding tables sharded over the ranks (or evaluate a "
                    "sharded checkpoint with --evaluate-from). Runs as one process without torchrun.")
    p.add_argument("--dataset", required=True,
                   help="ctr dataset: synthetic:rows=..,fields=..,vocab=.., womens-reviews, online-shoppers "
                        "or a CSV/parquet file (with --categorical/--dense/--label-column).")
    p.add_argument("--data-dir", default=None, help="Folder holding the datasets.")
    p.add_argument("--categorical", default=None, help="Table data: categorical columns, comma-separated.")
    p.add_argument("--dense", default=None, help="Table data: dense columns, comma-separated.")
    p.add_argument("--label-column", default=None, help="Table data: the label column.")
    p.add_argument("--out", default=None, help="Folder for the checkpoint and summary.json (needed to train).")
    p.add_argument("--overwrite", action="store_true", help="Replace OUT if it holds files.")
    p.add_argument("--resume", action="store_true",
                   help="Continue the run in OUT from its last saved epoch (on any number of ranks).")
    p.add_argument("--epochs", type=int, default=10, help="Most epochs (default 10; early stopping ends most runs sooner).")
    p.add_argument("--patience", type=int, default=2, help="Stop after this many epochs without a "
                   "better val AUC (default 2).")
    p.add_argument("--batch-size", type=int, default=1024, help="Global batch, split over the ranks (default 1024).")
    p.add_argument("--lr", type=float, default=2e-3, help="AdamW learning rate of the dense layers.")
    p.add_argument("--table-lr", type=float, default=0.1, help="Row-wise Adagrad learning rate of the tables (default 0.1).")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (dense layers only).")
    p.add_argument("--row-l2", type=float, default=20.0,
                   help="Frequency-aware L2 on looked-up rows: row_l2 * ||w||^2 / count per lookup (default 20; 0: off).")
    p.add_argument("--embed-dim", type=int, default=16, help="Embedding size (default 16).")
    p.add_argument("--hidden", default="256,128", help="MLP layer sizes, comma-separated (default 256,128).")
    p.add_argument("--row-wise-threshold-bytes", type=int, default=None,
                   help="Split tables at least this large row-wise (default: tables over a fair share).")
    p.add_argument("--max-steps", type=int, default=None, help="Cap on the steps per epoch.")
    p.add_argument("--eval-batch-size", type=int, default=4096, help="Rows per rank per evaluation batch.")
    p.add_argument("--seed", type=int, default=0, help="Seed for the split, the init and the shuffles.")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cpu (gloo) or cuda (nccl, one GPU per local rank).")
    p.add_argument("--timeout-s", type=float, default=120.0,
                   help="Seconds a rank waits for the others in a collective before failing (default 120).")
    p.add_argument("--evaluate-from", default=None, metavar="DIR",
                   help="Load a save_sharded checkpoint into this world size and report the test AUC.")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads per process (default: torch's; torchrun sets OMP_NUM_THREADS=1).")
    p.add_argument("--quiet", action="store_true", help="No per-epoch lines.")
    return p


def _ints(value: str, flag: str) -> list[int]:
    try:
        vals = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"{flag} takes comma-separated whole numbers, got {value!r}.",
                         f"For example {flag} 256,128.") from None
    if not vals or min(vals) < 1:
        raise UsageError(f"{flag} needs layer sizes >= 1, got {value!r}.", f"For example {flag} 256,128.")
    return vals


def _check_args(args: argparse.Namespace) -> None:
    """Checks that need no data and no process group (the same on every rank)."""
    for flag, value, low in (("--epochs", args.epochs, 1), ("--patience", args.patience, 1),
                             ("--batch-size", args.batch_size, 1), ("--embed-dim", args.embed_dim, 1),
                             ("--eval-batch-size", args.eval_batch_size, 1)):
        if value < low:
            raise UsageError(f"{flag} must be at least {low}, got {value}.")
    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads must be at least 1, got {args.threads}.")
    if args.max_steps is not None and args.max_steps < 1:
        raise UsageError(f"--max-steps must be at least 1, got {args.max_steps}.")
    for flag, value in (("--lr", args.lr), ("--table-lr", args.table_lr), ("--timeout-s", args.timeout_s)):
        if not value > 0:
            raise UsageError(f"{flag} must be > 0, got {value}.")
    if args.weight_decay < 0:
        raise UsageError(f"--weight-decay must be >= 0, got {args.weight_decay}.")
    if args.row_l2 < 0:
        raise UsageError(f"--row-l2 must be >= 0, got {args.row_l2}.")
    args.hidden_sizes = _ints(args.hidden, "--hidden")
    if args.dataset.split(":")[0].strip() == "synthetic":  # a bad spec fails here, before any rank waits
        from ..data.synthetic import parse_spec

        parse_spec(args.dataset)
    if args.evaluate_from is not None:
        ckpt = Path(args.evaluate_from)
        if not (ckpt / "plan.json").is_file() or not (ckpt / "config.json").is_file():
            raise UsageError(f"--evaluate-from {ckpt}: not a sharded checkpoint (no plan.json / config.json).",
                             f"Point it to the {CHECKPOINT}/ folder of a training run's --out.")
        return
    if args.out is None:
        raise UsageError("Training needs --out, the folder for the checkpoint and summary.json.",
                         "Add --out runs/sharded (or evaluate a checkpoint with --evaluate-from DIR).")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file.", "Give a folder path.")
    if args.resume and args.overwrite:
        raise UsageError("--resume and --overwrite contradict each other.", "Pass one of them.")
    if args.resume:
        from .checkpoint import LAST, TRAINER

        if not (out / CHECKPOINT / LAST / TRAINER).is_file():
            raise UsageError(f"--resume: {out} holds no saved training state ({CHECKPOINT}/{LAST}/{TRAINER}).",
                             "Point --out to the folder of an interrupted run, or start without --resume.")
    if out.is_dir() and any(out.iterdir()) and not (args.overwrite or args.resume):
        raise UsageError(f"--out {out} already holds files.",
                         "Pass --overwrite to replace them, --resume to continue that run, or pick another folder.")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise UsageError("--device cuda, but no CUDA device is available.", "Use --device cpu (gloo).")


def _env_rank() -> int:
    return int(os.environ.get("RANK", "0") or 0)


def init_group(device: str, timeout_s: float):
    """Join the default process group from torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR,
    MASTER_PORT), or make a group of one when there is no RANK. Returns the torch device."""
    import torch
    import torch.distributed as dist

    timeout = timedelta(seconds=timeout_s)
    cuda = device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise UsageError("--device cuda, but no CUDA device is available.", "Use --device cpu (gloo).")
    backend = "nccl" if cuda else "gloo"
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing:
            raise UsageError(f"RANK is set but {', '.join(missing)} is not.",
                             "Start the ranks with torchrun, or unset RANK to run a single process.")
        local = int(os.environ.get("LOCAL_RANK", "0"))
        dev = torch.device("cuda", local % torch.cuda.device_count()) if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(dev)
        dist.init_process_group(backend, timeout=timeout, **({"device_id": dev} if cuda else {}))
    else:
        dev = torch.device("cuda", 0) if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(dev)
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    return dev


def _load(args):
    from ..tasks import load_task

    csv = lambda v: [s.strip() for s in v.split(",") if s.strip()] if v else None  # noqa: E731
    task = load_task("ctr", args.dataset, data_dir=args.data_dir, seed=args.seed,
                     categorical=csv(args.categorical), dense=csv(args.dense), label_column=args.label_column)
    return task


def _split(task, name: str):
    s = task.splits[name]
    return s.inputs, s.labels


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Train (or evaluate) on this rank; the process group must be up. Returns the summary
    (complete on every rank; written to disk by rank 0)."""
    import torch.distributed as dist

    from ..models.deepfm import DeepFMConfig
    from .plan import plan_tables
    from .train import build_sharded_deepfm, config_tables, evaluate_sharded, train_sharded

    world, rank = dist.get_world_size(), dist.get_rank()
    say = (lambda s: print(s, flush=True)) if rank == 0 and not args.quiet else None
    started = time.perf_counter()
    task = _load(args)
    info = task.info
    if args.evaluate_from is not None:
        return _evaluate(args, task, world, rank, say)
    cfg = DeepFMConfig(vocab_sizes=info["vocab_sizes"], num_dense=len(info["dense"]),
                       embed_dim=args.embed_dim, hidden=args.hidden_sizes)
    plan = plan_tables(config_tables(cfg), world, args.row_wise_threshold_bytes)
    if rank == 0:
        print(plan.describe(), flush=True)
    model = build_sharded_deepfm(cfg, plan, seed=args.seed, device=args.torch_device)
    out = Path(args.out)
    ckpt = out / CHECKPOINT
    if rank == 0 and args.overwrite and out.is_dir():
        import shutil

        shutil.rmtree(ckpt, ignore_errors=True)
        (out / SUMMARY).unlink(missing_ok=True)
    dist.barrier()
    result = train_sharded(model, _split(task, "train"), _split(task, "val"), epochs=args.epochs,
                           batch_size=args.batch_size, lr=args.lr, table_lr=args.table_lr,
                           weight_decay=args.weight_decay, row_l2=args.row_l2, patience=args.patience,
                           seed=args.seed,
                           checkpoint_dir=ckpt, eval_batch_size=args.eval_batch_size,
                           metrics=task.metrics, max_steps=args.max_steps, log=say, resume=args.resume)
    test = evaluate_sharded(model, *_split(task, "test"), batch_size=args.eval_batch_size, metrics=task.metrics)
    summary = {"mode": "train", "dataset": args.dataset, "world_size": world, "backend": dist.get_backend(),
               "device": str(args.torch_device), "config": cfg.model_dump(mode="json"),
               "settings": {k: getattr(args, k) for k in ("epochs", "patience", "batch_size", "lr", "table_lr",
                                                          "weight_decay", "row_l2", "seed", "max_steps",
                                                          "timeout_s")},
               "optimizers": {"dense": "AdamW", "tables": "RowWiseAdagrad"},
               "rows": {k: len(v) for k, v in task.splits.items()},
               **result.summary(), "test": test, "plan": plan.model_dump(mode="json"),
               "plan_rank_bytes": plan.rank_bytes(), "total_seconds": time.perf_counter() - started}
    if say:
        say(f"best epoch {result.best_epoch}: val AUC {result.best_val_auc:.4f}; test AUC {test['auc']:.6f}; "
            f"checkpoint {ckpt}")
    if rank == 0:
        _write_json(out / SUMMARY, summary)
    dist.barrier()
    return summary


def _evaluate(args, task, world: int, rank: int, say) -> dict[str, Any]:
    """Load a save_sharded checkpoint into this world size (re-split when it differs from the one
    it was saved from) and score the test split."""
    import torch
    import torch.distributed as dist

    from ..errors import ModelError
    from ..models.deepfm import DeepFMConfig
    from .checkpoint import load_sharded
    from .plan import ShardingPlan, plan_tables
    from .train import config_tables, evaluate_sharded, peak_rss_bytes

    ckpt = Path(args.evaluate_from)
    cfg = DeepFMConfig.model_validate_json((ckpt / "config.json").read_text())
    saved = ShardingPlan.from_json(ckpt / "plan.json")
    want = task.info["vocab_sizes"]
    if list(cfg.vocab_sizes) != list(want) or cfg.num_dense != len(task.info["dense"]):
        raise ModelError(f"The checkpoint {ckpt} was trained with vocab sizes {cfg.vocab_sizes} and "
                         f"{cfg.num_dense} dense features; dataset {args.dataset} has {want} and "
                         f"{len(task.info['dense'])}.", "Evaluate on the dataset the checkpoint was trained on.")
    plan = saved if saved.world_size == world else plan_tables(config_tables(cfg), world,
                                                                args.row_wise_threshold_bytes)
    if rank == 0:
        print(plan.describe(), flush=True)
    model = load_sharded(ckpt, plan).to(args.torch_device)
    test = evaluate_sharded(model, *_split(task, "test"), batch_size=args.eval_batch_size, metrics=task.metrics)
    mem = torch.tensor([peak_rss_bytes(), model.tables.local_bytes()], device=args.torch_device)
    every = [torch.empty_like(mem) for _ in range(world)]
    dist.all_gather(every, mem)
    summary = {"mode": "evaluate", "checkpoint": str(ckpt), "saved_world_size": saved.world_size,
               "world_size": world, "dataset": args.dataset, "test": test,
               "ranks": [{"rank": r, "peak_rss_bytes": int(v[0]), "table_bytes": int(v[1])}
                         for r, v in enumerate(every)], "plan": plan.model_dump(mode="json")}
    if rank == 0:
        print(f"test AUC {test['auc']:.6f}  logloss {test['logloss']:.6f}  ({world} rank(s), checkpoint "
              f"saved from {saved.world_size})", flush=True)
        if args.out is not None:
            _write_json(Path(args.out) / EVALUATION, summary)
    dist.barrier()
    return summary


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    tmp.replace(path)


def print_error(exc: SlimcartError, prefix: str = "") -> None:
    """``error: MESSAGE`` and the hint on stderr, as the slimcart command prints them."""
    print(f"{prefix}error: {exc.message}", file=sys.stderr, flush=True)
    if exc.hint:
        print(exc.hint, file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code (0, or the error's code after printing it)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    rank = _env_rank()
    try:
        _check_args(args)  # the same on every rank: only rank 0 prints these errors
    except SlimcartError as exc:
        if rank == 0:
            print_error(exc)
        return exc.exit_code
    import torch
    import torch.distributed as dist

    from .train import peer_failure

    if args.threads is not None:
        torch.set_num_threads(args.threads)

    tag = f"[rank {rank}] " if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1 else ""
    try:
        try:
            args.torch_device = init_group(args.device, args.timeout_s)
        except SlimcartError:
            raise
        except Exception as exc:  # the rendezvous failed: a rank is missing or the address is wrong
            failure = peer_failure(exc, rank, args.timeout_s)
            raise failure or UsageError(f"Could not join the process group: {exc}".splitlines()[0],
                                        "Start the ranks with torchrun, or run without RANK set.") from exc
        try:
            run(args)
        except SlimcartError:
            raise
        except Exception as exc:
            failure = peer_failure(exc, rank, args.timeout_s)
            if failure is None:
                raise
            raise failure from exc
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
    except SlimcartError as exc:
        print_error(exc, tag)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"{tag}interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
