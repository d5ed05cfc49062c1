"""The fused depthwise block's eval, training forward and training backward on channels_last fp32 inputs at the
ConvMixer-768/32 and -256/8 layer shapes, and (mode "step") a whole training step (forward and backward) of
the converted paper ConvMixer-256/8 on NCHW batch-64 32 px images: wall-clock min and median, and the
process's CPU time, per call.

With --builds DIR,DIR,...: each DIR holds a copy of the package (DIR/convmixer_kernels with its _C), and the
builds run in alternating subprocesses, --rounds times, so that two builds compare side by side. On a shared VM
the wall time of back-to-back runs varies by 20-30%; the CPU time (both threads together) varies less, and the
table reports its median over the rounds next to the best wall time.

    python benchmarks/dw_train_ab.py [--modes eval,fwd,bwd,step] [--threads 2] [--reps 15]
    python benchmarks/dw_train_ab.py --builds /tmp/old,/tmp/new [--rounds 3]
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

SHAPES = {"768/32 k7 relu (2, 768, 32, 32)": (2, 768, 32, 7, "relu"),
          "256/8 k9 gelu (64, 256, 16, 16)": (64, 256, 16, 9, "gelu")}


def measure(modes, threads, reps):
    """{(shape, mode): (wall min ms, wall median ms, cpu ms per call)} for the package on sys.path."""
    import torch
    from convmixer_kernels.dw_block import dw_block
    from convmixer_kernels.numerics import make_block_params
    torch.set_num_threads(threads)
    out = {}
    if "step" in modes:
        import convmixer_kernels as ck
        from convmixer_kernels.reference import ConvMixerPaper
        torch.manual_seed(0)
        model = ck.convert(ConvMixerPaper(dim=256, depth=8, kernel_size=9, patch_size=2, n_classes=10, act="gelu"))
        images = torch.randn(64, 3, 32, 32)
        out["ConvMixer-256/8 training step"] = time_calls(lambda: model(images).sum().backward(), max(3, reps // 3))
    for name, (N, C, H, k, act) in SHAPES.items():
        p = make_block_params("dw", C, k)
        for n in ("weight", "bias", "gamma", "beta"):
            p[n].requires_grad_()
        args = [p[n] for n in ("weight", "bias", "gamma", "beta", "running_mean", "running_var", "num_batches_tracked")]
        x = torch.randn(N, C, H, H).contiguous(memory_format=torch.channels_last).requires_grad_()
        y = dw_block(x, *args, training=True, act=act, backend="cpu")
        dy = torch.randn_like(y)
        calls = {"eval": lambda: dw_block(x.detach(), *args, training=False, act=act, backend="cpu"),
                 "fwd": lambda: dw_block(x, *args, training=True, act=act, backend="cpu"),
                 "bwd": lambda: torch.autograd.grad(y, [x] + args[:4], dy, retain_graph=True)}
        for mode in modes:
            if mode != "step":
                out[f"{name} {mode}"] = time_calls(calls[mode], reps)
    return out


def time_calls(f, reps):
    """(wall min ms, wall median ms, CPU ms per call) of reps calls of f, after one untimed call."""
    f()
    walls, c0 = [], time.process_time()
    for _ in range(reps):
        t0 = time.perf_counter()
        f()
        walls.append(time.perf_counter() - t0)
    cpu = (time.process_time() - c0) / reps
    return min(walls) * 1e3, statistics.median(walls) * 1e3, cpu * 1e3


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--modes", default="eval,fwd,bwd")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--builds", default="", help="comma list of directories, each holding a convmixer_kernels copy")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    modes = a.modes.split(",")
    if a.child or not a.builds:
        res = measure(modes, a.threads, a.reps)
        if a.child:
            print(json.dumps(res))
            return
        print("| case | wall min ms | wall median ms | CPU ms per call |\n| --- | ---: | ---: | ---: |")
        for key, (mn, med, cpu) in res.items():
            print(f"| {key} | {mn:.2f} | {med:.2f} | {cpu:.2f} |")
        return
    builds = a.builds.split(",")
    runs = {b: [] for b in builds}
    for r in range(a.rounds):
        for b in builds:
            env = dict(os.environ, PYTHONPATH=os.path.abspath(b))
            cmd = [sys.executable, os.path.abspath(__file__), "--child", "--modes", a.modes, "--threads",
                   str(a.threads), "--reps", str(a.reps)]
            # cwd outside any checkout: the package is the one in b (its build stamp is not compared to sources)
            p = subprocess.run(cmd, env=env, cwd="/", capture_output=True, text=True, check=True)
            runs[b].append(json.loads(p.stdout.strip().splitlines()[-1]))
            print(f"[ab] round {r + 1}/{a.rounds} {b} done", file=sys.stderr, flush=True)
    keys = list(runs[builds[0]][0])
    print("| case | " + " | ".join(f"{os.path.basename(b.rstrip('/'))}: CPU ms (median) / wall min" for b in builds)
          + " |")
    print("| --- |" + " ---: |" * len(builds))
    for key in keys:
        cells = []
        for b in builds:
            cpu = statistics.median(run[key][2] for run in runs[b])
            wall = min(run[key][0] for run in runs[b])
            cells.append(f"{cpu:.1f} / {wall:.2f}")
        print(f"| {key} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
