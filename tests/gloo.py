"""Running a job on several CPU processes in one gloo group, for the model-parallel tests: each
worker saves what the job returned (or its traceback) to a folder that the test reads."""
from __future__ import annotations

import os
import socket
import traceback
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist


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
