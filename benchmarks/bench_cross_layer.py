"""Cross-layer fusion on or off, side by side in one process: ConvMixer-256/8 (k=9, p=2) on 32 px
images, channels_last, fused with the device's default backend; medians of interleaved repetitions.

    python benchmarks/bench_cross_layer.py [--batch 32] [--reps 15] [--device cpu]
"""
import argparse
import copy
import statistics
import time

import torch

import convmixer_kernels as ck


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    on = ck.ConvMixer(256, 8, 9, 2, 10).to(args.device, memory_format=torch.channels_last)
    off = ck.set_cross_layer(copy.deepcopy(on), False)
    x = torch.randn(args.batch, 3, 32, 32, device=args.device).contiguous(memory_format=torch.channels_last)

    def sync():
        if args.device == "cuda":
            torch.cuda.synchronize()

    for train in (True, False):
        times = {"on": [], "off": []}
        for rep in range(args.reps + 1):  # the first repetition warms up
            for name, m in (("on", on), ("off", off)):
                m.train(train)
                sync()
                t0 = time.perf_counter()
                if train:
                    m(x).sum().backward()
                else:
                    with torch.no_grad():
                        m(x)
                sync()
                if rep:
                    times[name].append(time.perf_counter() - t0)
        a, b = statistics.median(times["on"]), statistics.median(times["off"])
        print(f"{'train' if train else 'eval ':<5} cross-layer on {a * 1e3:8.1f} ms  off {b * 1e3:8.1f} ms  "
              f"off/on {b / a:.3f}x")


if __name__ == "__main__":
    main()
