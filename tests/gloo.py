"""Running a job on several CPU processes in one gloo group, for the distributed tests: each
worker saves what the job returned (or its traceback) to a folder that the test reads; every wait
has a deadline and leftover processes are killed, so a failing test cannot hang."""
from __future__ import annotations

import os
import socket
import time
import traceback
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def gloo_worker(rank: int, world: int, port: int, out: str, job, arg, timeout_s: float = 30) -> None:
    """``job(rank, world, arg)`` in a gloo group; its result goes to OUT/result-RANK.pt, a failure's
    traceback to OUT/error-RANK.txt."""
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s))
        try:
            result = job(rank, world, arg)
        finally:
            dist.destroy_process_group()
        torch.save(result, Path(out) / f"result-{rank}.pt")
    except BaseException:
        (Path(out) / f"error-{rank}.txt").write_text(traceback.format_exc())
        raise


def start(job, world: int, out: Path, arg=None, timeout_s: float = 30) -> list:
    """``world`` spawned processes running ``job(rank, world, arg)`` in a gloo group."""
    out.mkdir(parents=True, exist_ok=True)
    ctx, port = mp.get_context("spawn"), free_port()
    procs = [ctx.Process(target=gloo_worker, args=(r, world, port, str(out), job, arg, timeout_s), daemon=True)
             for r in range(world)]
    for p in procs:
        p.start()
    return procs


def finish(procs: list, out: Path, deadline: float) -> list:
    """Wait (until ``deadline``, a time.monotonic() value) and return what every rank returned."""
    try:
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        errors = "\n".join(p.read_text() for p in sorted(out.glob("error-*.txt")))
        alive = [r for r, p in enumerate(procs) if p.is_alive()]
        if errors or alive:
            pytest.fail(f"ranks still running: {alive}\n{errors}", pytrace=False)
        return [torch.load(out / f"result-{r}.pt", weights_only=True) for r in range(len(procs))]
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(5)
