"""Data-parallel training of a fused ConvMixer on scikit-learn's handwritten digits, the way ConvMixer
is trained on ImageNet (timm's train.py --amp [--sync-bn] on several GPUs), scaled down to run anywhere.

Run with torchrun, one process per rank (gloo on the CPU, NCCL on GPUs):

    torchrun --nproc_per_node 2 examples/train_ddp.py                     # CPU, 2 ranks
    torchrun --nproc_per_node 2 examples/train_ddp.py --amp --sync-bn     # + AMP, synchronized BatchNorm
    torchrun --nproc_per_node 2 examples/train_ddp.py --device cuda --amp --sync-bn   # one GPU per rank

The paper's ConvMixer (dim 64, depth 4, kernel 5, GELU, patch 1 on the 8x8 images; the grey channel
repeated 3x) is built from the seed on every rank, converted with `convmixer_kernels.convert(...,
sync_bn=--sync-bn)` and wrapped in DistributedDataParallel. Each rank trains on its own shard of the
seeded 80/20 split (rank r takes every world_size-th training image of each shuffled epoch), so the
global batch is --batch-size x world_size. --amp runs the forward under torch.autocast (bf16 on the CPU,
fp16 on CUDA; --amp-dtype overrides) with torch.amp.GradScaler. --sync-bn computes every BatchNorm's
training statistics over the global batch with the package's fused synchronized BN (it works on CPU
with gloo, which nn.SyncBatchNorm does not).

Every rank prints its progress; rank 0 evaluates the test accuracy after each epoch (eval mode: no
collectives) and at the end writes every rank's loss curve and the test accuracy to --out (a PNG).
The exit status is non-zero when the final test accuracy is below --min-acc.
"""
from __future__ import annotations

import argparse
import datetime
import math
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

try:  # run from a checkout without installing the package
    import convmixer_kernels  # noqa: F401
except ImportError:  # pragma: no cover
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import convmixer_kernels as ck
from convmixer_kernels.reference import ConvMixerPaper

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_digits import NUM_CLASSES, load_data  # noqa: E402  (the same data and split)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=32, help="per-rank batch size")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--kernel-size", type=int, default=5)
    p.add_argument("--lr", type=float, default=0.1, help="peak learning rate (SGD, momentum 0.9, cosine decay)")
    p.add_argument("--amp", action="store_true", help="torch.autocast + torch.amp.GradScaler")
    p.add_argument("--amp-dtype", choices=("bfloat16", "float16"), default=None,
                   help="autocast dtype (default: bfloat16 on the CPU, float16 on CUDA)")
    p.add_argument("--sync-bn", action="store_true", help="synchronized BatchNorm over all ranks (fused)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--backend", default="auto", help="fused kernel backend (convmixer_kernels.available_backends())")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-steps-per-epoch", type=int, default=None, help="for quick runs and the tests")
    p.add_argument("--min-acc", type=float, default=0.0, help="fail (exit 1) below this final test accuracy, %%")
    p.add_argument("--out", default="train_ddp.png")
    return p.parse_args(argv)


def setup(device: str):
    if "RANK" not in os.environ:
        raise SystemExit("run this script with torchrun, e.g. torchrun --nproc_per_node 2 examples/train_ddp.py")
    dist.init_process_group("nccl" if device == "cuda" else "gloo", timeout=datetime.timedelta(seconds=120))
    rank, world = dist.get_rank(), dist.get_world_size()
    if device == "cuda":
        local = int(os.environ.get("LOCAL_RANK", rank))
        torch.cuda.set_device(local)
        return rank, world, torch.device("cuda", local)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    return rank, world, torch.device("cpu")


@torch.no_grad()
def accuracy(model, x, y, device, batch=256):
    model.eval()
    correct = sum((model(x[i:i + batch].to(device)).argmax(1).cpu() == y[i:i + batch]).sum().item()
                  for i in range(0, len(y), batch))
    model.train()
    return 100.0 * correct / len(y)


def plot(path, losses_per_rank, accs, args, world):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for r, losses in enumerate(losses_per_rank):
        a.plot(losses, label=f"rank {r}", lw=1)
    a.set_xlabel("step")
    a.set_ylabel("training loss (local shard)")
    a.set_yscale("log")
    a.legend()
    b.plot(range(1, len(accs) + 1), accs, "o-")
    b.set_xlabel("epoch")
    b.set_xticks(range(1, len(accs) + 1))
    b.set_ylabel("test accuracy, % (rank 0, eval mode)")
    mode = ", ".join(m for m, on in (("AMP", args.amp), ("sync BN", args.sync_bn)) if on) or "fp32"
    fig.suptitle(f"fused ConvMixer-{args.dim}/{args.depth} on digits, DDP x{world} ({args.device}; {mode})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    rank, world, device = setup(args.device)
    try:
        x_train, y_train, x_test, y_test = load_data(args.seed)
        torch.manual_seed(args.seed)  # the same initial weights on every rank (DDP also broadcasts them)
        model = ck.convert(ConvMixerPaper(args.dim, args.depth, args.kernel_size, 1, NUM_CLASSES, act="gelu"),
                           backend=args.backend, sync_bn=args.sync_bn).to(device)
        ddp = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        amp_dtype = getattr(torch, args.amp_dtype) if args.amp_dtype else (
            torch.float16 if device.type == "cuda" else torch.bfloat16)
        scaler = torch.amp.GradScaler(device.type, enabled=args.amp)
        opt = torch.optim.SGD(ddp.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)
        global_batch = args.batch_size * world
        steps = len(y_train) // global_batch
        if args.max_steps_per_epoch:
            steps = min(steps, args.max_steps_per_epoch)
        total = steps * args.epochs
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / total)))
        if rank == 0:
            print(f"DDP x{world} on {args.device}, {'AMP ' + str(amp_dtype)[6:] if args.amp else 'fp32'}, "
                  f"sync_bn={args.sync_bn}: {steps} steps/epoch, global batch {global_batch}", flush=True)
        losses, accs, t0 = [], [], time.time()
        for epoch in range(args.epochs):
            order = torch.randperm(len(y_train), generator=torch.Generator().manual_seed(args.seed + epoch))
            for step in range(steps):
                idx = order[step * global_batch:(step + 1) * global_batch][rank::world]
                xb, yb = x_train[idx].to(device), y_train[idx].to(device)
                with torch.autocast(device.type, dtype=amp_dtype, enabled=args.amp):
                    out = ddp(xb)
                loss = F.cross_entropy(out.float(), yb)
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
                sched.step()
                losses.append(loss.item())
            acc = accuracy(model, x_test, y_test, device) if rank == 0 else float("nan")
            accs.append(acc)
            recent = sum(losses[-steps:]) / steps
            print(f"[rank {rank}] epoch {epoch + 1}/{args.epochs}: mean loss {recent:.4f}"
                  + (f", test accuracy {acc:.2f}%" if rank == 0 else "") + f" ({time.time() - t0:.1f} s)", flush=True)
        all_losses = [None] * world
        dist.all_gather_object(all_losses, losses)
        if rank == 0:
            plot(args.out, all_losses, accs, args, world)
            print(f"final test accuracy {accs[-1]:.2f}%; loss curves: {args.out}", flush=True)
        ok = torch.tensor([accs[-1] >= args.min_acc if rank == 0 else True], dtype=torch.int32, device=device)
        dist.broadcast(ok, 0)
        return 0 if ok.item() else 1
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    rc = main()
    # Exit without interpreter finalization (as multiprocessing's forked children do). DDP keeps the gloo
    # process group (and its worker threads) alive past destroy_process_group(), and a worker releasing the
    # last collective's tensors takes the GIL to drop their Python objects; if finalization has begun by
    # then, the thread is unwound and the process aborts ("terminate called without an active exception",
    # SIGABRT, ~1 run in 15 here; the core shows ProcessGroupGloo::runLoop -> ~AsyncBroadcastWork ->
    # gil_scoped_acquire). Everything this script writes is closed by now.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)
