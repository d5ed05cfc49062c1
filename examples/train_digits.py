"""Train a small ConvMixer on scikit-learn's handwritten digits twice, unfused and fused, and compare.

The data set is `sklearn.datasets.load_digits` (1797 grey 8x8 images of the digits 0-9, shipped with
scikit-learn: nothing is downloaded), split 80/20 (stratified, seeded) into train and test sets.

One reference model, the paper's ConvMixer (`convmixer_kernels.reference.ConvMixerPaper`, plain
PyTorch layers; patch size 1 on the 8x8 images, the grey channel repeated three times because the
paper's stem takes RGB), is built once from the seed. Two deep copies of it are then trained side by
side with identical optimizers, learning-rate schedules and batch order:

  * "reference": the plain PyTorch layers, unfused;
  * "fused":     the same weights after `convmixer_kernels.convert(..., backend=--backend)`
                 (on the CPU, backend "auto" runs the package's C++ kernels; cross-layer fusion on
                 unless --no-cross-layer).

A third copy is run in float64 on the CPU for the first --check-steps steps only. The script records the
training loss of every step, prints the loss and test accuracy of both runs after each epoch, writes
both loss curves, their difference and the test accuracies to one PNG, and checks:

  (a) numerics, first --check-steps steps: per step, |fused - ref64| <= 2 * |ref32 - ref64| + atol on the
      loss (the rule of DESIGN.md section 4, `convmixer_kernels.numerics.rule`, atol 1e-5 for fp32);
  (b) accuracy: the final test accuracies of the two runs differ by at most --acc-tol percentage
      points (default 1). The two runs are not bit-identical (fp32 rounding differs between fused and
      unfused code) and their small differences compound over the steps, so this is the end-to-end
      check: the fused model must train as well as the reference, not identically.

The exit status is non-zero if either check fails. Test accuracy is measured in eval mode (BatchNorm
running statistics), which lag behind the fast-changing weights of the first epochs: expect low test
accuracies for the first epoch or two even when the training loss is already small.

Run it from the repository root (about 25 s on 2 idle CPU cores with the defaults):

    .venv/bin/python examples/train_digits.py
    .venv/bin/python examples/train_digits.py --epochs 5 --dim 32 --out /tmp/digits.png
    .venv/bin/python examples/train_digits.py --device cuda          # fused backend "auto" on the GPU

`main(argv)` runs the same thing from Python and returns a dict (accuracies, per-step losses, checks).
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

try:  # run from a checkout without installing the package
    import convmixer_kernels  # noqa: F401
except ImportError:  # pragma: no cover
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import convmixer_kernels as ck
from convmixer_kernels.numerics import rule
from convmixer_kernels.reference import ConvMixerPaper

NUM_CLASSES = 10


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--epochs", type=int, default=10, help="training epochs")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--dim", type=int, default=64, help="ConvMixer width (channels)")
    p.add_argument("--depth", type=int, default=4, help="number of ConvMixer layers")
    p.add_argument("--kernel-size", type=int, default=5, help="depthwise kernel size")
    p.add_argument("--act", default="gelu", choices=("gelu", "gelu_tanh", "relu"))
    p.add_argument("--lr", type=float, default=0.05, help="peak learning rate (SGD, momentum 0.9, cosine decay)")
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--backend", default="auto",
                   help="fused backend: auto, cpu, triton, cuda, cuda_emu (see convmixer_kernels.available_backends())")
    p.add_argument("--no-cross-layer", action="store_true",
                   help="convert(..., cross_layer=False): every BN apply stays in its own block")
    p.add_argument("--device", default="cpu", help="cpu or cuda (the float64 reference always runs on the CPU)")
    p.add_argument("--seed", type=int, default=0, help="seeds the split, the initial weights and the batch order")
    p.add_argument("--out", default="train_digits.png", help="where to write the loss-curve PNG")
    p.add_argument("--max-steps-per-epoch", type=int, default=None,
                   help="stop each epoch after this many steps (for quick runs and the tests)")
    p.add_argument("--check-steps", type=int, default=3,
                   help="number of first steps whose loss is checked against a float64 reference run")
    p.add_argument("--acc-tol", type=float, default=1.0,
                   help="allowed |fused - reference| final test accuracy, in percentage points")
    p.add_argument("--quiet", action="store_true", help="print only the summary")
    args = p.parse_args(argv)
    if args.check_steps < 1 or args.epochs < 1:
        p.error("--check-steps and --epochs must be at least 1")
    return args


def load_data(seed: int):
    """(x_train, y_train, x_test, y_test): images (N, 3, 8, 8) in float32, standardized with the training
    set's mean and std, the grey channel repeated 3x (the paper's stem is Conv2d(3, dim, ...))."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1)  # (1797, 1, 8, 8), values 0..16
    y = torch.tensor(digits.target, dtype=torch.long)
    idx_train, idx_test = train_test_split(torch.arange(len(y)).numpy(), test_size=0.2, stratify=y.numpy(),
                                           random_state=seed)
    idx_train, idx_test = torch.from_numpy(idx_train), torch.from_numpy(idx_test)
    x_train, x_test = x[idx_train], x[idx_test]
    mean, std = x_train.mean(), x_train.std()
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    return x_train.repeat(1, 3, 1, 1), y[idx_train], x_test.repeat(1, 3, 1, 1), y[idx_test]


class Run:
    """One model with its own optimizer and schedule; every run steps on the same batches."""

    def __init__(self, name: str, model: nn.Module, device, dtype, args, total_steps: int):
        self.name, self.model, self.device, self.dtype = name, model.to(device=device, dtype=dtype), device, dtype
        self.model.train()
        self.opt = torch.optim.SGD(self.model.parameters(), lr=args.lr, momentum=0.9,
                                   weight_decay=args.weight_decay)
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total_steps) / total_steps)))
        self.losses: list[float] = []
        self.loss_tensors: list[torch.Tensor] = []  # the first steps' losses, for the numerics rule
        self.accs: list[float] = []
        self.seconds = 0.0

    def step(self, xb: torch.Tensor, yb: torch.Tensor, keep_tensor: bool = False) -> float:
        xb = xb.to(device=self.device, dtype=self.dtype)
        yb = yb.to(self.device)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        self.opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(self.model(xb), yb)
        loss.backward()
        self.opt.step()
        self.sched.step()
        value = loss.item()  # synchronizes
        self.seconds += time.perf_counter() - t0
        self.losses.append(value)
        if keep_tensor:
            self.loss_tensors.append(loss.detach().cpu())
        return value

    @torch.no_grad()
    def accuracy(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """Test accuracy in percent, in eval mode (BatchNorm running statistics)."""
        self.model.eval()
        pred = self.model(x.to(device=self.device, dtype=self.dtype)).argmax(1).cpu()
        self.model.train()
        acc = 100.0 * (pred == y).double().mean().item()
        self.accs.append(acc)
        return acc


def plot(path: str, ref: Run, fused: Run, args) -> None:
    """Left: both loss curves (top) and their difference per step (bottom); right: test accuracy per epoch."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig = plt.figure(figsize=(12, 6))
    grid = fig.add_gridspec(2, 2, width_ratios=[2, 1], height_ratios=[2.2, 1])
    ax_loss = fig.add_subplot(grid[0, 0])
    ax_diff = fig.add_subplot(grid[1, 0], sharex=ax_loss)
    ax_acc = fig.add_subplot(grid[:, 1])

    steps = range(1, len(ref.losses) + 1)
    ax_loss.plot(steps, ref.losses, label="reference (PyTorch layers, unfused)", color="tab:blue", lw=1.6)
    ax_loss.plot(steps, fused.losses, label=f"fused (convmixer_kernels, backend={args.backend})",
                 color="tab:orange", lw=1.0, ls="--")
    ax_loss.set_yscale("log")
    ax_loss.set_ylabel("training loss\n(cross-entropy, log scale)")
    ax_loss.set_title("Training loss per step")
    ax_loss.grid(True, which="both", alpha=0.3)
    ax_loss.legend()
    ax_loss.tick_params(labelbottom=False)

    # |fused - reference| per step; an exact 0 (identical losses) is drawn at the bottom of the axis.
    diff = [abs(f - r) for f, r in zip(fused.losses, ref.losses)]
    floor = min([d for d in diff if d > 0], default=1e-9) / 2
    ax_diff.plot(steps, [max(d, floor) for d in diff], color="tab:gray", lw=0.8)
    ax_diff.set_yscale("log")
    ax_diff.set_xlabel("training step")
    ax_diff.set_ylabel("|fused - reference|\nloss difference")
    ax_diff.grid(True, which="both", alpha=0.3)

    epochs = range(1, len(ref.accs) + 1)
    ax_acc.plot(epochs, ref.accs, "o-", label="reference", color="tab:blue")
    ax_acc.plot(epochs, fused.accs, "s--", label="fused", color="tab:orange", mfc="none")
    ax_acc.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("test accuracy (%)")
    ax_acc.set_title(f"Test accuracy: {ref.accs[-1]:.2f}% (reference), {fused.accs[-1]:.2f}% (fused)", fontsize=10)
    ax_acc.grid(True, alpha=0.3)
    ax_acc.legend(loc="lower right")

    fig.suptitle(f"ConvMixer-{args.dim}/{args.depth} (kernel {args.kernel_size}, {args.act}) on sklearn digits, "
                 f"seed {args.seed}, {args.device}")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    args = parse_args(argv)
    say = (lambda *a, **k: None) if args.quiet else print
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda was asked for, but no CUDA device is visible")

    x_train, y_train, x_test, y_test = load_data(args.seed)
    n_train = len(y_train)
    batches_per_epoch = math.ceil(n_train / args.batch_size)
    if args.max_steps_per_epoch is not None:
        batches_per_epoch = min(batches_per_epoch, args.max_steps_per_epoch)
    total_steps = args.epochs * batches_per_epoch

    # One model from the seed; every run starts from a deep copy of it.
    torch.manual_seed(args.seed)
    init = ConvMixerPaper(args.dim, args.depth, kernel_size=args.kernel_size, patch_size=1,
                          n_classes=NUM_CLASSES, act=args.act)
    fused_model, report = ck.convert(copy.deepcopy(init), backend=args.backend, inplace=True, return_report=True,
                                     cross_layer=not args.no_cross_layer)
    n_dw = sum(what.startswith("depthwise") for _, what in report.fused)
    n_conv = sum(what.startswith("conv") for _, what in report.fused)
    if report.skipped or n_dw != args.depth or n_conv != args.depth + 1:
        raise RuntimeError(f"expected the stem and every layer's two blocks fused:\n{report}")
    ref = Run("reference", copy.deepcopy(init), device, torch.float32, args, total_steps)
    fused = Run("fused", fused_model, device, torch.float32, args, total_steps)
    ref64 = Run("ref64", copy.deepcopy(init), torch.device("cpu"), torch.float64, args, total_steps)

    say(f"digits: {n_train} train / {len(y_test)} test images; ConvMixer-{args.dim}/{args.depth}, kernel "
        f"{args.kernel_size}, {args.act}; {args.epochs} epochs x {batches_per_epoch} steps (batch {args.batch_size}); "
        f"device {args.device}; fused backend {args.backend!r} ({len(report.fused)} blocks fused, cross-layer "
        f"{'off' if args.no_cross_layer else 'on'})")
    say(f"{'epoch':>5}  {'loss ref':>9}  {'loss fused':>10}  {'acc ref':>8}  {'acc fused':>9}  {'elapsed':>8}")
    start = time.perf_counter()

    gen = torch.Generator().manual_seed(args.seed)  # the batch order, shared by all runs
    step = 0
    for epoch in range(1, args.epochs + 1):
        perm = torch.randperm(n_train, generator=gen)
        first = len(ref.losses)
        for b in range(batches_per_epoch):
            idx = perm[b * args.batch_size:(b + 1) * args.batch_size]
            xb, yb = x_train[idx], y_train[idx]
            check = step < args.check_steps
            ref.step(xb, yb, keep_tensor=check)
            fused.step(xb, yb, keep_tensor=check)
            if check:
                ref64.step(xb, yb, keep_tensor=True)
            step += 1
        acc_r, acc_f = ref.accuracy(x_test, y_test), fused.accuracy(x_test, y_test)
        mean_r = sum(ref.losses[first:]) / (len(ref.losses) - first)
        mean_f = sum(fused.losses[first:]) / (len(fused.losses) - first)
        say(f"{epoch:>5}  {mean_r:>9.4f}  {mean_f:>10.4f}  {acc_r:>7.2f}%  {acc_f:>8.2f}%  "
            f"{time.perf_counter() - start:>7.1f}s")

    # (a) numerics of the first steps: the loss of each step against the float64 run.
    loss_checks = [rule(f"step {i} loss", fused.loss_tensors[i], ref.loss_tensors[i], ref64.loss_tensors[i],
                        torch.float32) for i in range(len(ref64.loss_tensors))]
    numerics_ok = bool(loss_checks) and all(c.ok for c in loss_checks)
    # (b) final test accuracies.
    acc_diff = fused.accs[-1] - ref.accs[-1]
    accuracy_ok = abs(acc_diff) <= args.acc_tol

    print(f"numerics, first {len(loss_checks)} step(s) vs float64 "
          f"(|fused - ref64| <= 2 * |ref32 - ref64| + 1e-5): {'PASS' if numerics_ok else 'FAIL'}")
    for i, c in enumerate(loss_checks):
        print(f"  step {i}: loss ref64 {ref64.losses[i]:.9f}, ref32 {ref.losses[i]:.9f}, fused {fused.losses[i]:.9f}; {c}")
    print(f"final test accuracy: reference {ref.accs[-1]:.2f}%, fused {fused.accs[-1]:.2f}%, "
          f"difference {acc_diff:+.2f} points (allowed: |difference| <= {args.acc_tol:g}): {'PASS' if accuracy_ok else 'FAIL'}")
    print(f"training time (forward + backward + optimizer, informational): reference {ref.seconds:.1f} s, "
          f"fused {fused.seconds:.1f} s")

    plot(args.out, ref, fused, args)
    print(f"loss curves written to {args.out}")

    return {
        "ok": numerics_ok and accuracy_ok,
        "numerics_ok": numerics_ok,
        "accuracy_ok": accuracy_ok,
        "loss_checks": loss_checks,
        "acc_ref": ref.accs[-1],
        "acc_fused": fused.accs[-1],
        "acc_diff": acc_diff,
        "accs_ref": ref.accs,
        "accs_fused": fused.accs,
        "losses_ref": ref.losses,
        "losses_fused": fused.losses,
        "losses_ref64": ref64.losses,
        "seconds_ref": ref.seconds,
        "seconds_fused": fused.seconds,
        "out": args.out,
        "report": report,
    }


if __name__ == "__main__":
    sys.exit(0 if main()["ok"] else 1)
