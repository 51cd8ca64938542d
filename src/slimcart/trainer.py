"""One training loop for every technique that trains: weighted loss terms, per-step callbacks,
hidden outputs captured by forward hooks, and resumable checkpoints (safetensors + JSON).

With the defaults (the task's own loss, no callbacks) it is the loop ``Task.train_model`` has
always run: AdamW over ``task.param_groups``, linear warm-up then linear decay, gradient
clipping at 5.0, the batch order of ``Task.batches(shuffle=True, seed=cfg.seed + epoch)``.

In a torch.distributed process group of several ranks (e.g. under torchrun) it trains
data-parallel (see ``slimcart.parallel.data_parallel``): each rank takes its contiguous slice of
every global batch, the gradients are averaged weighted by the slices' rows before clipping, and
the logged losses are those of the global batch, so the steps are those of one process up to
floating-point summation order. Loss terms must be means over the rows (or not depend on the
batch) for that to hold; batch-norm statistics are per slice (rank 0's running statistics are
kept) and dropout masks per rank. Only rank 0 writes checkpoints; every rank resumes from the same
one, whatever world size wrote it.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from .errors import ModelError, UsageError, closest
from .tasks.base import Task, TrainConfig

CLIP_NORM = 5.0
WEIGHTS, STATE = "trainer.safetensors", "trainer.json"
CHANNELS_LAST_MIN_SIDE = 64  # pixels: photos train channels-last (use_channels_last)


@dataclass
class Batch:
    """What loss terms and callbacks see at one step."""

    inputs: tuple[Tensor, ...]
    labels: Tensor
    outputs: Tensor
    step: int                  # optimizer steps done before this batch
    epoch: int
    hidden: dict[str, Tensor]  # outputs of the modules named in ``capture``
    index: Tensor              # row indices of this batch in the train split


class LossTerm:
    """One weighted part of the training loss; subclasses implement ``__call__``."""

    name: str = "loss"
    weight: float = 1.0

    def __call__(self, batch: Batch, model: nn.Module) -> Tensor:
        raise NotImplementedError


@dataclass
class TaskLoss(LossTerm):
    """The task's own loss on the model outputs (the default term)."""

    task: Task
    weight: float = 1.0
    name: str = "task"

    def __call__(self, batch: Batch, model: nn.Module) -> Tensor:
        return self.task.loss(batch.outputs, batch.labels)


class Callback:
    """Hooks into the loop; every method is an optional no-op."""

    def on_start(self, trainer: "Trainer") -> None: ...
    def on_batch_start(self, trainer: "Trainer", batch_inputs: tuple[Tensor, ...]) -> None: ...
    def on_step_end(self, trainer: "Trainer") -> None: ...   # after optimizer and scheduler step
    def on_epoch_end(self, trainer: "Trainer") -> None: ...  # after the last step of a whole epoch
    def on_end(self, trainer: "Trainer") -> None: ...

    # What a checkpoint keeps of the callback, to resume it (tensors and JSON values).
    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class AfterStep(Callback):
    """Calls ``fn(model)`` after each optimizer step (e.g. to re-apply pruning masks)."""

    def __init__(self, fn: Callable[[nn.Module], None]):
        self.fn = fn

    def on_step_end(self, trainer: "Trainer") -> None:
        self.fn(trainer.model)


class EarlyStopping(Callback):
    """Scores the validation split after every whole epoch; asks the trainer to stop after
    ``patience`` epochs without a better primary metric, and puts the best epoch's weights back
    at the end. ``history`` holds each epoch's score."""

    def __init__(self, task: Task, patience: int):
        self.task, self.patience = task, patience
        self.best: float | None = None
        self.best_epoch, self.waited, self.stopped = 0, 0, False
        self.history: list[float] = []
        self.weights: dict[str, Tensor] | None = None

    def _better(self, value: float) -> bool:
        if self.best is None:
            return True
        if math.isnan(value) or math.isnan(self.best):
            return not math.isnan(value)  # a number beats NaN, nothing beats a number
        return value > self.best if self.task.higher_is_better else value < self.best

    def on_start(self, trainer: "Trainer") -> None:
        if self.stopped:  # resumed from the checkpoint of a run that had stopped
            trainer.should_stop = True

    def on_epoch_end(self, trainer: "Trainer") -> None:
        value = float(self.task.evaluate(trainer.model, "val")[self.task.primary_metric])
        trainer.model.train()
        self.history.append(value)
        epoch = len(self.history)
        if self._better(value):
            self.best, self.best_epoch, self.waited = value, epoch, 0
            self.weights = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
        else:
            self.waited += 1
            if self.waited >= self.patience:
                self.stopped = trainer.should_stop = True

    def on_end(self, trainer: "Trainer") -> None:
        if self.weights is not None and self.best_epoch != len(self.history):
            trainer.model.load_state_dict(self.weights)

    def record(self) -> dict[str, Any]:
        return {"val_history": self.history, "best_epoch": self.best_epoch, "best_val": self.best,
                "stopped_early": self.stopped, "patience": self.patience}

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"json": {"best": self.best, "best_epoch": self.best_epoch,
                                          "waited": self.waited, "stopped": self.stopped,
                                          "history": self.history}}
        if self.weights is not None:
            state["tensors"] = self.weights
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        j = state.get("json", {})
        self.best, self.best_epoch = j.get("best"), int(j.get("best_epoch", 0))
        self.waited, self.stopped = int(j.get("waited", 0)), bool(j.get("stopped", False))
        self.history = list(j.get("history", []))
        self.weights = state.get("tensors") or None


def make_optimizer(task: Task, model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over ``task.param_groups``; with ``cfg.table_optimizer == "rowwise_adagrad"`` the
    plain embedding weights move to one row-wise Adagrad group at ``cfg.table_lr``."""
    groups = task.param_groups(model, cfg)
    if cfg.table_optimizer == "adamw":
        return torch.optim.AdamW(groups, weight_decay=cfg.weight_decay, foreach=True)
    from .optim import TablesAndAdamW, table_parameters

    tables = table_parameters(model)
    ids = {id(p) for p in tables}
    rest = [{**g, "params": [p for p in g["params"] if id(p) not in ids]} for g in groups]
    rest = [g for g in rest if g["params"]]
    rows = [{"params": tables, "lr": cfg.table_lr or 0.05, "rows": True}] if tables else []
    return TablesAndAdamW(rest + rows, weight_decay=cfg.weight_decay)


class Trainer:
    def __init__(self, task: Task, model: nn.Module, cfg: TrainConfig, *,
                 terms: Sequence[LossTerm] | None = None, callbacks: Sequence[Callback] = (),
                 capture: Sequence[str] = (), checkpoint_dir: Path | str | None = None,
                 checkpoint_every: int | str = 0, progress: bool = True, desc: str = "train"):
        self.task, self.model, self.cfg = task, model, cfg
        self.terms = list(terms) if terms else task.default_terms(model, cfg)
        names = [t.name for t in self.terms]
        if len(set(names)) != len(names):
            raise UsageError(f"Loss term names must be unique; got {names}.")
        self.callbacks, self.progress, self.desc = list(callbacks), progress, desc
        self.early = EarlyStopping(task, cfg.patience) if cfg.patience else None
        if self.early is not None:
            self.callbacks.append(self.early)
        self.should_stop = False
        modules = dict(model.named_modules())
        for name in capture:
            if name not in modules:
                valid = [n for n in modules if n][:8]
                raise UsageError(f"capture: the model has no layer {name!r}.{closest(name, list(modules))}",
                                 f"Layers include: {', '.join(valid)}")
        self.capture = {n: modules[n] for n in capture}
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.rows = len(task.splits["train"])
        self.steps_per_epoch = math.ceil(self.rows / cfg.batch_size)
        if checkpoint_every == "epoch":
            checkpoint_every = self.steps_per_epoch
        self.checkpoint_every = int(checkpoint_every) if self.checkpoint_dir is not None else 0
        total = math.ceil(cfg.epochs * self.steps_per_epoch)
        self.total = min(total, cfg.max_steps) if cfg.max_steps else total
        self.optimizer = make_optimizer(task, model, cfg)
        warm, total = int(cfg.warmup_ratio * self.total), self.total
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda s: (s + 1) / max(1, warm) if s < warm else max(0.0, (total - s) / max(1, total - warm)))
        self.step, self.epoch, self.batch = 0, 0, None
        self.losses: list[float] = []
        self.term_values: dict[str, list[float]] = {n: [] for n in names}
        self.resumed_from: int | None = None
        self._rng: Tensor | None = None
        self._hidden: dict[str, Tensor] = {}
        self.world, self.rank = world_and_rank()
        if self.checkpoint_dir is not None and (self.checkpoint_dir / STATE).is_file():
            self._load()

    # ---- the loop -----------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        torch.manual_seed(self.cfg.seed)
        if self._rng is not None:
            torch.set_rng_state(self._rng)
        data = self.task.splits["train"]
        world, rank = self.world, self.rank
        if world > 1:
            from .parallel.data_parallel import broadcast_module, check_same, rows_of

            if not check_same([self.step, self.rows], next(self.model.parameters()).device):
                raise UsageError("The ranks start from different steps or data: they did not all find the "
                                 f"same checkpoint in {self.checkpoint_dir}, or loaded different data.",
                                 "Put the checkpoint folder on a file system every rank sees.")
            broadcast_module(self.model)
        hooks = [m.register_forward_hook(self._hook(n)) for n, m in self.capture.items()]
        channels_last = use_channels_last(self.model, data.inputs, world)
        if channels_last:
            self.model.to(memory_format=torch.channels_last)
        bar = tqdm(total=self.total, initial=self.step, desc=self.desc, leave=False, unit="step",
                   disable=True if not self.progress or rank else None)
        t0 = time.perf_counter()
        self.model.train()
        sparse = self._sparse_tables()
        try:
            for cb in self.callbacks:
                cb.on_start(self)
            while self.step < self.total and not self.should_stop:
                self.epoch = self.step // self.steps_per_epoch
                gen = torch.Generator().manual_seed(self.cfg.seed + self.epoch)  # as Task.batches
                order = torch.randperm(self.rows, generator=gen)
                first = (self.step % self.steps_per_epoch) * self.cfg.batch_size
                for start in range(first, self.rows, self.cfg.batch_size):
                    idx = order[start:start + self.cfg.batch_size]
                    n = len(idx)
                    if world > 1:
                        idx = idx[rows_of(n, world, rank)]
                    x = tuple(t[idx] for t in data.inputs)
                    if channels_last:
                        x = (x[0].contiguous(memory_format=torch.channels_last),) + x[1:]
                    self._train_step(self.task.collate(x) if len(idx) else x, data.labels[idx], idx, n)
                    bar.update(1)
                    if bar.n % 10 == 1 or bar.n == self.total:  # the postfix costs more than a small step
                        post = {"loss": f"{np.mean(self.losses[-50:]):.4f}",
                                "lr": f"{self.optimizer.param_groups[0]['lr']:.2e}"}
                        if self.early is not None and self.early.history:
                            post[f"val {self.task.primary_metric}"] = f"{self.early.history[-1]:.4f}"
                        bar.set_postfix(post)
                    end = self.step % self.steps_per_epoch == 0
                    if self.checkpoint_every and self.step % self.checkpoint_every == 0 and not end:
                        self._save()
                    if self.step >= self.total:
                        break
                if self.step % self.steps_per_epoch == 0:
                    for cb in self.callbacks:
                        cb.on_epoch_end(self)
                    if self.checkpoint_every and self.step % self.checkpoint_every == 0:
                        self._save()  # after the epoch's callbacks, so a resumed run does not redo them
            for cb in self.callbacks:
                cb.on_end(self)
        finally:
            if channels_last:  # saved weights, exports and later stages see the usual layout
                self.model.to(memory_format=torch.contiguous_format)
            for m, flag in sparse:
                m.sparse = flag
            for h in hooks:
                h.remove()
            self._hidden = {}
            bar.close()
        self.model.eval()
        val = self.task.evaluate(self.model, "val")
        record = {"steps": self.step, "epochs": round(self.step / self.steps_per_epoch, 3),
                  "seconds": round(time.perf_counter() - t0, 1),
                  "final_loss": float(np.mean(self.losses[-50:])) if self.losses else None, "val": val,
                  "terms": {n: float(np.mean(v[-50:])) for n, v in self.term_values.items() if v},
                  "resumed_from_step": self.resumed_from,
                  "memory_format": "channels_last" if channels_last else "contiguous"}
        if self.early is not None:
            record["early_stopping"] = self.early.record()
        return record

    def _sparse_tables(self) -> list[tuple[nn.Module, bool]]:
        """With row-wise table updates, the tables' lookups give sparse gradients while training
        (only the looked-up rows are touched); the flags are put back after ``fit``."""
        if self.cfg.table_optimizer != "rowwise_adagrad":
            return []
        from .optim import table_parameters

        tables = {id(p) for p in table_parameters(self.model)}
        out = []
        for m in self.model.modules():
            if isinstance(m, nn.Embedding) and id(m._parameters.get("weight")) in tables:
                out.append((m, m.sparse))
                m.sparse = True
        return out

    def _train_step(self, x: tuple[Tensor, ...], y: Tensor, idx: Tensor, total: int) -> None:
        """One optimizer step; ``idx`` are this rank's rows of a global batch of ``total`` rows."""
        if self.world > 1:
            from .parallel.data_parallel import step_seed

            torch.manual_seed(step_seed(self.cfg.seed, self.step, self.rank))
        loss, values = None, []
        if len(idx):  # a rank gets no rows only when a global batch has fewer rows than ranks
            for cb in self.callbacks:
                cb.on_batch_start(self, x)
            self._hidden = {}
            outputs = self.model(*x)
            self.batch = Batch(x, y, outputs, self.step, self.epoch, self._hidden, idx)
            for term in self.terms:
                value = term(self.batch, self.model)
                values.append(value.detach())
                part = value if term.weight == 1.0 else term.weight * value
                loss = part if loss is None else loss + part
        else:
            self.batch = Batch(x, y, y.new_empty(0), self.step, self.epoch, {}, idx)
        self.optimizer.zero_grad(set_to_none=True)
        if self.world == 1:
            loss.backward()
            logged = [v.item() for v in values] + [loss.item()]
        else:
            logged = self._reduce(loss, values, len(idx) / total)
        for term, v in zip(self.terms, logged):
            self.term_values[term.name].append(v)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), CLIP_NORM)
        self.optimizer.step()
        self.scheduler.step()
        if self.world > 1:
            from .parallel.data_parallel import broadcast_float_buffers

            broadcast_float_buffers(self.model)
        self.step += 1
        for cb in self.callbacks:
            cb.on_step_end(self)
        self.losses.append(logged[-1])

    def _reduce(self, loss: Tensor | None, values: list[Tensor], share: float) -> list[float]:
        """Backward of this rank's share of the loss, then the gradients and the logged values
        summed over the ranks: those of the mean over the global batch."""
        from .parallel.data_parallel import all_reduce_step

        params = list({id(p): p for g in self.optimizer.param_groups for p in g["params"]}.values())
        dev = params[0].device
        if loss is not None:
            (loss * share).backward()
            logged = torch.stack([*values, loss.detach()]).to(dev, torch.float64) * share
        else:
            logged = torch.zeros(len(self.terms) + 1, dtype=torch.float64, device=dev)
        return all_reduce_step(params, logged).tolist()

    def _hook(self, name: str):
        def hook(_module, _inputs, output):
            self._hidden[name] = output if isinstance(output, Tensor) else output[0]
        return hook

    # ---- checkpoints ------------------------------------------------------------------
    def config_hash(self) -> str:
        key = {"config": self.cfg.model_dump(mode="json"), "rows": self.rows,
               "terms": [[t.name, t.weight] for t in self.terms]}
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]

    def _save(self) -> None:
        if self.rank == 0:
            self._write()
        if self.world > 1:  # no rank goes on (and may read it) before the files are complete
            import torch.distributed as dist

            dist.barrier()

    def _write(self) -> None:
        folder = self.checkpoint_dir
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {f"model.{k}": v.detach().contiguous().clone() for k, v in self.model.state_dict().items()}
        opt = self.optimizer.state_dict()
        extra: dict[str, dict[str, Any]] = {}
        for pid, st in opt["state"].items():
            for k, v in st.items():
                if isinstance(v, Tensor):
                    tensors[f"optim.{pid}.{k}"] = v.detach().contiguous().clone()
                else:
                    extra.setdefault(str(pid), {})[k] = v
        tensors["rng.cpu"] = torch.get_rng_state()
        callbacks: dict[str, Any] = {}
        for i, cb in enumerate(self.callbacks):
            st = cb.state_dict()
            if st:
                callbacks[str(i)] = st.get("json", {})
                for k, v in (st.get("tensors") or {}).items():
                    tensors[f"callback.{i}.{k}"] = v.detach().contiguous().clone()
        meta = {"step": str(self.step), "config_hash": self.config_hash()}
        state = {"step": self.step, "epoch": self.epoch, "config": self.cfg.model_dump(mode="json"),
                 "config_hash": self.config_hash(), "scheduler": self.scheduler.state_dict(),
                 "optimizer": {"param_groups": opt["param_groups"], "state": extra},
                 "losses": self.losses[-50:], "terms": {n: v[-50:] for n, v in self.term_values.items()},
                 "callbacks": callbacks}
        _atomic(folder / WEIGHTS, lambda p: save_file(tensors, str(p), metadata=meta))
        _atomic(folder / STATE, lambda p: p.write_text(json.dumps(state, indent=1)))

    def _load(self) -> None:
        folder = self.checkpoint_dir
        state = json.loads((folder / STATE).read_text())
        if state.get("config_hash") != self.config_hash():
            raise UsageError(f"The checkpoint in {folder} was written by another training configuration "
                             f"({state.get('config')}); this run uses {self.cfg.model_dump(mode='json')}.",
                             "Use another checkpoint_dir, or remove that checkpoint to start over.")
        with safe_open(str(folder / WEIGHTS), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        if meta.get("step") != str(state["step"]) or meta.get("config_hash") != state["config_hash"]:
            raise ModelError(f"{folder / WEIGHTS} and {folder / STATE} are from different steps "
                             "(interrupted while writing).", "Remove both files to start over.")
        self.model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        opt_state = {int(p): dict(v) for p, v in state["optimizer"]["state"].items()}
        for k, v in tensors.items():
            if k.startswith("optim."):
                _, pid, name = k.split(".", 2)
                opt_state.setdefault(int(pid), {})[name] = v
        groups = [{k: tuple(v) if isinstance(v, list) and k != "params" else v for k, v in g.items()}
                  for g in state["optimizer"]["param_groups"]]
        self.optimizer.load_state_dict({"state": opt_state, "param_groups": groups})
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = self.resumed_from = int(state["step"])
        self.epoch = int(state["epoch"])
        self.losses = list(state["losses"])
        self.term_values.update({n: list(v) for n, v in state["terms"].items() if n in self.term_values})
        self._rng = tensors["rng.cpu"]
        for i, cb in enumerate(self.callbacks):
            saved = state.get("callbacks", {}).get(str(i))
            if saved is not None:
                prefix = f"callback.{i}."
                cb.load_state_dict({"json": saved, "tensors": {k[len(prefix):]: v for k, v in tensors.items()
                                                               if k.startswith(prefix)}})


def use_channels_last(model: nn.Module, inputs: Sequence[Tensor], world: int) -> bool:
    """Convolutional networks on photos (64 px and larger) train in the channels-last layout, in one
    process: oneDNN's NHWC convolutions, depthwise ones above all, ran EfficientNet-Lite0's training
    steps ~1.5x faster than NCHW here (benchmarks/train_layout.py). The same arithmetic up to
    summation order. Small images (e.g. 28 px Fashion-MNIST) keep the default layout, where no gain
    was measured; so do runs under torch.distributed, whose collectives take only tensors
    contiguous in the default layout."""
    return (world == 1 and len(inputs) > 0 and inputs[0].dim() == 4 and inputs[0].is_floating_point()
            and min(inputs[0].shape[-2:]) >= CHANNELS_LAST_MIN_SIDE
            and any(isinstance(m, nn.Conv2d) for m in model.modules()))


def world_and_rank() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def _atomic(path: Path, write: Callable[[Path], None]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)
