"""Runs a function on several local torch.distributed ranks (gloo on 127.0.0.1): the multi-process tests
and the DDP benchmark use it. Each rank is a spawned process with one compute thread; every collective
and the wait for the ranks are bounded in time, and no child process outlives the call."""
from __future__ import annotations

import datetime
import os
import socket
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

TIMEOUT_S = 120  # per collective; the parent waits this plus start-up for the ranks to finish


def free_port() -> int:
    """A TCP port free on the loopback address now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world, port, threads, fn, args):
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=TIMEOUT_S))
    try:
        fn(rank, world, *args)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def spawn_ranks(fn, world: int, *args, timeout: float = TIMEOUT_S + 120, threads: int = 1):
    """Runs fn(rank, world, *args) (a module-level function) on `world` spawned processes in a gloo group
    on 127.0.0.1. Raises on any rank's failure (with its traceback) or when the ranks have not all
    finished within `timeout` seconds; always kills and reaps every child before returning."""
    ctx = mp.start_processes(_entry, args=(world, free_port(), threads, fn, args), nprocs=world, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + timeout
    try:
        while not ctx.join(timeout=max(0.1, min(5.0, deadline - time.monotonic()))):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{fn.__name__}: ranks still running after {timeout:.0f} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
            p.join(10)
