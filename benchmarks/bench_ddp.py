"""DDP training step of a fused ConvMixer on local gloo ranks: synchronized BN on against off, measured
side by side in one run (the variants interleaved step by step, medians reported), plus the sync BN
collectives per step counted on the fly (calls and bytes per rank) next to what nn.SyncBatchNorm issues.

    .venv/bin/python benchmarks/bench_ddp.py                       # ConvMixer-256/8, 2 ranks x 1 thread
    .venv/bin/python benchmarks/bench_ddp.py --dim 256 --depth 8 --batch 8 --size 32 --steps 10

Prints a table on rank 0 and writes it as CSV (--csv).
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.nn as nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import convmixer_kernels as ck  # noqa: E402
from convmixer_kernels import sync_bn  # noqa: E402
from convmixer_kernels.launch import spawn_ranks  # noqa: E402


class _CountingDist:
    """torch.distributed as seen by convmixer_kernels.sync_bn: counts its collectives (calls, bytes sent
    per rank) and the wall time spent inside them (which includes waiting for the other ranks)."""

    def __init__(self):
        self.calls = {"all_gather": [0, 0], "all_reduce": [0, 0]}
        self.seconds = 0.0

    def __getattr__(self, k):
        return getattr(dist, k)

    def _timed(self, name, t, fn, *a, **kw):
        self.calls[name][0] += 1
        self.calls[name][1] += t.numel() * t.element_size()
        t0 = time.perf_counter()
        out = fn(*a, **kw)
        self.seconds += time.perf_counter() - t0
        return out

    def all_gather(self, out, t, **kw):
        return self._timed("all_gather", t, dist.all_gather, out, t, **kw)

    def all_reduce(self, t, **kw):
        return self._timed("all_reduce", t, dist.all_reduce, t, **kw)


def _rank(rank, world, args):
    torch.manual_seed(0)
    base = ck.ConvMixer(args.dim, args.depth, args.kernel_size, args.patch, 10, act="gelu")
    variants = {"sync_bn off": base, "sync_bn on": ck.set_sync_bn(copy.deepcopy(base))}
    ddp = {k: nn.parallel.DistributedDataParallel(m) for k, m in variants.items()}
    opts = {k: torch.optim.SGD(m.parameters(), lr=0.01) for k, m in ddp.items()}
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(args.batch, 3, args.size, args.size, generator=g)
    y = torch.randint(0, 10, (args.batch,), generator=g)
    times = {k: [] for k in ddp}
    counter = _CountingDist()
    for step in range(args.warmup + args.steps):
        for name, m in ddp.items():
            if name == "sync_bn on" and step >= args.warmup:
                sync_bn.dist = counter  # count the measured steps' collectives
            dist.barrier()
            t0 = time.perf_counter()
            opts[name].zero_grad(set_to_none=True)
            nn.functional.cross_entropy(m(x), y).backward()
            opts[name].step()
            dt = time.perf_counter() - t0
            sync_bn.dist = dist
            if step >= args.warmup:
                times[name].append(dt)
    med = {k: torch.tensor([statistics.median(v)]) for k, v in times.items()}
    coll_ms = counter.seconds * 1e3 / args.steps
    for v in med.values():
        dist.all_reduce(v, op=dist.ReduceOp.MAX)  # a step takes as long as the slowest rank
    if rank == 0:
        n_bn = 1 + 2 * args.depth
        C = args.dim
        params = sum(p.numel() for p in base.parameters())
        print(f"ConvMixer-{args.dim}/{args.depth} k{args.kernel_size} p{args.patch}, {world} gloo ranks x 1 thread, "
              f"batch {args.batch}/rank at {args.size} px; {args.steps} steps after {args.warmup} warm-up, "
              f"interleaved; median of the slowest rank")
        off, on = med["sync_bn off"].item(), med["sync_bn on"].item()
        rows = [("sync_bn off", off * 1e3, 1.0), ("sync_bn on", on * 1e3, on / off)]
        print(f"{'variant':<12} {'ms/step':>9} {'vs off':>7}")
        for r in rows:
            print(f"{r[0]:<12} {r[1]:9.1f} {r[2]:7.3f}")
        ag = [v // args.steps for v in counter.calls["all_gather"]]
        ar = [v // args.steps for v in counter.calls["all_reduce"]]
        print(f"sync BN collectives per step (counted): {ag[0]} all_gather of {ag[1]} B/rank, "
              f"{ar[0]} all_reduce of {ar[1]} B/rank; {n_bn} BN layers of C={C}; rank 0 spent "
              f"{coll_ms:.1f} ms/step inside them (mean; includes waiting for the other ranks)")
        print(f"nn.SyncBatchNorm per step (torch/nn/modules/_functions.py): {n_bn} all_gather of "
              f"{n_bn * (2 * C + 1) * 4} B/rank ([mean, invstd, count]), {n_bn} all_reduce of {n_bn * 2 * C * 4} B/rank "
              f"([sum dy, sum dy*xmu]); DDP's gradient all_reduce: {params * 4} B/rank")
        if args.csv:
            with open(args.csv, "w") as f:
                f.write("variant,ms_per_step,ratio_vs_off,all_gather,all_gather_bytes,all_reduce,all_reduce_bytes\n")
                f.write(f"sync_bn off,{off * 1e3:.3f},1.000,0,0,0,0\n")
                f.write(f"sync_bn on,{on * 1e3:.3f},{on / off:.3f},{ag[0]},{ag[1]},{ar[0]},{ar[1]}\n")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--depth", type=int, default=8)
    p.add_argument("--kernel-size", type=int, default=9)
    p.add_argument("--patch", type=int, default=2)
    p.add_argument("--batch", type=int, default=8, help="images per rank")
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--csv", default=None)
    args = p.parse_args(argv)
    spawn_ranks(_rank, args.world, args, timeout=1200)


if __name__ == "__main__":
    main()
