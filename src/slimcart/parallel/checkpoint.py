"""Checkpoints of a sharded DeepFM: one safetensors file per rank with its rows, the replicated
layers, the plan and the model config beside them. A checkpoint saved from N ranks loads into
any number of ranks: each rank reads just the row ranges its new plan gives it.

A training state (``save_training_state``) is such a checkpoint plus the optimizers: the row-wise
Adagrad accumulators, one file per rank, split like the rows (so they reshard the same way), the
dense layers' AdamW moments, and the trainer's counters (``trainer.json``). It is written to
``DIR.next`` and swapped in when every rank has written, so a run killed while saving keeps the
previous state."""
from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path
from typing import Mapping

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ..errors import ModelError, UsageError
from ..models.deepfm import DeepFM, DeepFMConfig
from .deepfm import PREFIXES, ShardedDeepFM
from .plan import ShardingPlan

PLAN, CONFIG, DENSE = "plan.json", "config.json", "dense.safetensors"
OPTIMIZER_DENSE, TRAINER = "optimizer-dense.safetensors", "trainer.json"
LAST = "last"  # the training state, under a training run's checkpoint directory
TABLE_PREFIXES = tuple(f"{p}." for p in PREFIXES)


def shard_file(rank: int, world_size: int) -> str:
    return f"shard-{rank:05d}-of-{world_size:05d}.safetensors"


def optimizer_file(rank: int, world_size: int) -> str:
    return f"optimizer-{rank:05d}-of-{world_size:05d}.safetensors"


def save_sharded(module: ShardedDeepFM, directory: str | Path) -> Path:
    """Every rank writes its shards; rank 0 also writes the plan, the config and the dense layers."""
    out, tables = Path(directory), module.tables
    out.mkdir(parents=True, exist_ok=True)
    rows = {n: w.detach().cpu().contiguous() for n, w in tables.local_shards().items()}
    save_file(rows, str(out / shard_file(tables.rank, tables.plan.world_size)),
              metadata={"rank": str(tables.rank), "world_size": str(tables.plan.world_size)})
    if tables.rank == 0:
        save_file({k: v.detach().cpu().contiguous() for k, v in module.dense_state().items()},
                  str(out / DENSE))
        tables.plan.to_json(out / PLAN)
        (out / CONFIG).write_text(module.config.model_dump_json(indent=2))
    dist.barrier(group=tables.group)
    return out


def gather_state(module: ShardedDeepFM, dst: int = 0) -> dict[str, torch.Tensor] | None:
    """The full ``DeepFM.state_dict()`` on rank ``dst`` (None on the others); call on every rank.
    Row-pruned fields give their compact rows and ``embeddings.{i}.id_map``, as a DeepFM with the
    same ``apply_row_pruning`` record holds them."""
    tables = module.tables
    rank, group, local = tables.rank, tables.group, tables.local_shards()
    out = {} if rank == dst else None
    for name in tables.tables:
        p = tables.plan.tables[name]
        full = torch.empty(p.rows, p.dim, dtype=tables.dtype) if rank == dst else None
        for owner, start, end in p.shards():
            if owner == rank == dst:
                full[start:end] = local[name].detach().cpu()
            elif owner == rank:
                dist.send(local[name].detach().contiguous(), group=group, group_dst=dst)
            elif rank == dst:
                dev = module.bias.device
                buf = torch.empty(end - start, p.dim, dtype=tables.dtype, device=dev)
                dist.recv(buf, group=group, group_src=owner)
                full[start:end] = buf.cpu()
        if out is not None:
            out[f"{name}.weight"] = full
    if out is not None:
        for k, v in module.dense_state().items():  # a row-pruned field's map, as CompactEmbedding keeps it
            key = f"embeddings.{k.split('.')[1]}.id_map" if k.startswith("id_maps.") else k
            out[key] = v.detach().cpu().clone()
    return out


def load_sharded(source: str | Path | Mapping[str, torch.Tensor], plan: ShardingPlan | None = None,
                 rank: int | None = None, group=None, cfg: DeepFMConfig | None = None) -> ShardedDeepFM:
    """A ShardedDeepFM for this rank from a ``save_sharded`` directory or a full state dict.

    ``plan`` may differ from the one saved (other ranks, other placements): the rows are re-split.
    Without it, the saved plan is used, which needs as many ranks as it was saved from. For a
    state dict without ``cfg``, the config is read off the tensor shapes (dropout taken as 0)."""
    world, here = dist.get_world_size(group), dist.get_rank(group)
    if rank is not None and rank != here:
        raise UsageError(f"load_sharded was given rank={rank} but this process is rank {here}.",
                         "Leave rank out, or pass dist.get_rank(group).")
    with contextlib.ExitStack() as files:
        if isinstance(source, Mapping):
            cfg = cfg or _config_from_state(source)
            dense = {k: v for k, v in source.items() if not k.startswith(TABLE_PREFIXES)}
            read = lambda name, start, end: source[f"{name}.weight"][start:end]  # noqa: E731
        else:
            saved, cfg_saved, dense, read = _open_directory(Path(source), files)
            cfg = cfg or cfg_saved
            if plan is None and saved.world_size != world:
                raise UsageError(
                    f"The checkpoint {source} was saved from {saved.world_size} ranks, with a plan "
                    f"for {saved.world_size} ranks, but this process group has {world} ranks.",
                    f"Pass plan=plan_tables(deepfm_tables(model), {world}) to re-split the tables.")
            plan = plan or saved
        if plan is None:
            raise UsageError("load_sharded needs a plan to load a state dict.",
                             "Pass plan=plan_tables(deepfm_tables(model), world_size).")
        plan.check_world_size(world)
        # The dense layers only: tables of one row each stand in for the real ones.
        stub = DeepFM(cfg.model_copy(update={"vocab_sizes": [1] * len(cfg.vocab_sizes)}))
        shards = {}
        for name in [f"{p}.{i}" for p in PREFIXES for i in range(len(cfg.vocab_sizes))]:
            rows = plan.tables[name].local_rows(here) if name in plan.tables else None
            if rows is not None:
                shards[name] = read(name, *rows)
    maps = {int(k.split(".")[1]): v for k, v in dense.items() if k.startswith("id_maps.")}
    model = ShardedDeepFM(cfg, plan, stub, group=group, shards=shards, id_maps=maps)
    result = model.load_state_dict(dense, strict=False)
    bad = [k for k in result.missing_keys if not k.startswith("tables.")] + list(result.unexpected_keys)
    if bad:
        raise ModelError(f"The checkpoint's dense layers do not fit the DeepFM config: {bad}.",
                         "Pass the cfg the model was built with.")
    return model


def _open_directory(d: Path, files: contextlib.ExitStack):
    if not (d / PLAN).is_file() or not (d / CONFIG).is_file():
        raise UsageError(f"{d} is not a sharded checkpoint (no {PLAN} / {CONFIG}).",
                         "Point to a directory written by save_sharded.")
    saved = ShardingPlan.from_json(d / PLAN)
    names = [shard_file(r, saved.world_size) for r in range(saved.world_size)]
    missing = [n for n in names if not (d / n).is_file()]
    if missing or not (d / DENSE).is_file():
        raise UsageError(f"The checkpoint {d} was saved from {saved.world_size} ranks but lacks "
                         f"{', '.join(missing) or DENSE}.",
                         f"Copy all {saved.world_size} rank files and {DENSE} into {d}.")
    cfg = DeepFMConfig.model_validate_json((d / CONFIG).read_text())
    return saved, cfg, load_file(str(d / DENSE)), _row_reader(d, saved, names, files)


def _row_reader(d: Path, saved: ShardingPlan, names: list[str], files: contextlib.ExitStack):
    """``read(table, start, end)``: rows start:end of a table whose shards lie in the per-rank
    files ``names`` (model rows or optimizer accumulators), split as the ``saved`` plan says."""
    handles = [files.enter_context(safe_open(str(d / n), framework="pt")) for n in names]

    def read(name: str, start: int, end: int) -> torch.Tensor:
        if name not in saved.tables:
            raise UsageError(f"Table {name!r} is not in the checkpoint {d}.",
                             "Load it with a model config that matches the saved one.")
        pieces = []
        for owner, lo, hi in saved.tables[name].shards():
            a, b = max(start, lo), min(end, hi)
            if a < b:
                pieces.append(handles[owner].get_slice(name)[a - lo:b - lo])
        rows = torch.cat(pieces)
        if rows.shape[0] != end - start:
            raise UsageError(f"Table {name!r} has {saved.tables[name].rows} rows in the checkpoint "
                             f"but the plan asks for rows {start}:{end}.",
                             "Make the plan from the saved model (see config.json).")
        return rows

    return read


def save_training_state(module: ShardedDeepFM, table_opt, dense_opt, directory: str | Path,
                        trainer: dict) -> Path:
    """The model, both optimizers and ``trainer`` (JSON) in ``directory``; call on every rank."""
    tables = module.tables
    rank, world, group = tables.rank, tables.plan.world_size, tables.group
    out = Path(directory)
    nxt, old = out.with_name(out.name + ".next"), out.with_name(out.name + ".old")
    if rank == 0:
        shutil.rmtree(nxt, ignore_errors=True)
    dist.barrier(group=group)
    save_sharded(module, nxt)
    acc = {n: table_opt.state[p]["sum"].detach().cpu().reshape(-1, 1).contiguous()
           for n, p in tables.local_shards().items()}
    save_file(acc, str(nxt / optimizer_file(rank, world)))
    if rank == 0:
        sd = dense_opt.state_dict()
        moments = {f"{i}.{k}": v.detach().cpu().contiguous() for i, st in sd["state"].items()
                   for k, v in st.items() if torch.is_tensor(v)}
        save_file(moments, str(nxt / OPTIMIZER_DENSE))
        (nxt / TRAINER).write_text(json.dumps({**trainer, "world_size": world,
                                               "dense_param_groups": sd["param_groups"]}, indent=1))
    dist.barrier(group=group)
    if rank == 0:
        shutil.rmtree(old, ignore_errors=True)
        if out.exists():
            out.rename(old)
        nxt.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    dist.barrier(group=group)
    return out


def load_training_state(directory: str | Path, module: ShardedDeepFM, table_opt, dense_opt) -> dict:
    """Put a ``save_training_state`` directory (from any number of ranks) into ``module`` and the
    optimizers on this rank's plan; returns the trainer's counters. Call on every rank."""
    d = Path(directory)
    if not (d / TRAINER).is_file():
        raise UsageError(f"No training state to resume from in {d} (no {TRAINER}).",
                         "Resume a run that saved at least one epoch there, or start without resume.")
    trainer = json.loads((d / TRAINER).read_text())
    tables = module.tables
    device = module.bias.device
    fresh = load_sharded(d, tables.plan, group=tables.group, cfg=module.config)
    module.load_state_dict(fresh.to(device).state_dict())
    saved = ShardingPlan.from_json(d / PLAN)
    names = [optimizer_file(r, saved.world_size) for r in range(saved.world_size)]
    missing = [n for n in (*names, OPTIMIZER_DENSE) if not (d / n).is_file()]
    if missing:
        raise UsageError(f"The training state {d} lacks {', '.join(missing)}.",
                         "Copy every rank's files into it, or start without resume.")
    with contextlib.ExitStack() as files:
        read = _row_reader(d, saved, names, files)
        for name, p in tables.local_shards().items():
            start, end = tables.plan.tables[name].local_rows(tables.rank)
            table_opt.state[p]["sum"].copy_(read(name, start, end).reshape(-1).to(device))
    moments = load_file(str(d / OPTIMIZER_DENSE))
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in moments.items():
        i, k = key.split(".", 1)
        state.setdefault(int(i), {})[k] = value.to(device) if k != "step" else value
    try:
        dense_opt.load_state_dict({"state": state, "param_groups": trainer["dense_param_groups"]})
    except (ValueError, KeyError) as exc:
        raise ModelError(f"The optimizer state in {d} does not fit this model's dense layers: {exc}",
                         "Resume with the settings the run was started with.") from None
    return trainer


def _config_from_state(state: Mapping[str, torch.Tensor]) -> DeepFMConfig:
    fields = sum(1 for k in state if k.startswith("embeddings.") and k.endswith(".weight"))
    mlp = sorted(int(k.split(".")[1]) for k in state if k.startswith("mlp.") and k.endswith(".weight"))
    if not fields or mlp != list(range(0, 2 * len(mlp), 2)):
        raise UsageError("Cannot read the DeepFM config off this state dict (no embeddings, or an "
                         "MLP with dropout layers).", "Pass cfg=DeepFMConfig(...) to load_sharded.")
    dense = state.get("dense_linear.weight")
    return DeepFMConfig(vocab_sizes=[state[f"embeddings.{i}.weight"].shape[0] for i in range(fields)],
                        embed_dim=state["embeddings.0.weight"].shape[1],
                        num_dense=0 if dense is None else dense.shape[1],
                        hidden=[state[f"mlp.{i}.weight"].shape[0] for i in mlp[:-1]])
