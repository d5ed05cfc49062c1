"""The fused depthwise block (eval, fp32 and bf16, channels_last) against the machine's FMA peak (issue 12):
the peak from csrc/cpu/fma_peak.cpp (independent vector FMA chains, no memory traffic) measured in the
same process, and oneDNN's depthwise conv (eager nn.Conv2d, channels_last: conv alone, no act/BN/residual)
as a comparison point, in the same dtype (bf16: BN parameters fp32, the AMP convention). FLOPs count the conv's
2*k*k per output only. In bf16, where the build has AVX512_BF16 pair dots (off by default), the fused block runs
with them switched on and, side by side, off (fp32 FMAs on an fp32 padded copy), and the pair-dot peak is
measured too.

    python benchmarks/dw_vs_peak.py [--threads 2] [--reps 20] [--dtypes fp32,bf16] [--shapes 768,256]
"""
import argparse
import statistics
import time

import torch

import convmixer_kernels as ck
from convmixer_kernels import _C
from convmixer_kernels._library import PendingBN

SHAPES = {"768/32 layer (2, 768, 32, 32) k7 relu": (2, 768, 32, 7, "relu"),
          "256/8 layer (64, 256, 16, 16) k9 gelu": (64, 256, 16, 9, "gelu")}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--shapes", default="768,256", help="comma list of 768, 256")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    peak = statistics.median(_C.cpu_fma_peak_gflops() for _ in range(5))
    print(f"fp32 FMA peak, {a.threads} threads: {peak:.1f} GFLOP/s (median of 5)")
    pairs = _C.cpu_bf16_pair_dots_built()
    if pairs:
        dot_peak = statistics.median(_C.cpu_bf16_dot_peak_gflops() for _ in range(5))
        print(f"bf16 pair-dot peak, {a.threads} threads: {dot_peak:.1f} GFLOP/s (median of 5)")
    else:
        dot_peak = None
        print("bf16 pair dots: not in this build (bf16 runs fp32 FMAs)")
    for name, (N, C, H, k, act) in SHAPES.items():
        if name.split("/")[0] not in a.shapes.split(","):
            continue
        for dt_name in a.dtypes.split(","):
            run_shape(name, N, C, H, k, act, {"fp32": torch.float32, "bf16": torch.bfloat16}[dt_name], a.reps, peak,
                      dot_peak if dt_name == "bf16" else None)


def run_shape(name, N, C, H, k, act, dt, reps, peak, dot_peak=None):
    torch.manual_seed(0)
    x = torch.randn(N, C, H, H).contiguous(memory_format=torch.channels_last).to(dt)
    w, b = (torch.randn(C, 1, k, k) * 0.1).to(dt), torch.randn(C).to(dt)
    ga, be, rm, rv = torch.rand(C) + 0.5, torch.randn(C), torch.randn(C), torch.rand(C) + 0.5
    pend = PendingBN(x, torch.randn(C), torch.rand(C) + 0.5, torch.randn(C))
    conv = torch.nn.Conv2d(C, C, k, groups=C, padding="same").eval().to(dt).to(memory_format=torch.channels_last)
    def with_pair_dots(f):  # the same call with the bf16 pair dots switched on
        def g():
            before = _C.cpu_bf16_pair_dots()
            _C.set_cpu_bf16_pair_dots(True)
            try:
                return f()
            finally:
                _C.set_cpu_bf16_pair_dots(before)
        return g

    fs = {"fused block": lambda: ck.dw_block(x, w, b, ga, be, rm, rv, None, False, act=act, backend="cpu"),
          "fused block, pending BN input": lambda: ck.dw_block(pend, w, b, ga, be, rm, rv, None, False, act=act,
                                                               backend="cpu"),
          "oneDNN depthwise conv alone": lambda: conv(x)}
    if dt == torch.bfloat16 and _C.cpu_bf16_pair_dots_built():
        fs = {"fused block (pair dots)": with_pair_dots(fs["fused block"]), "fused block, fp32 FMAs": fs["fused block"],
              "fused block, pending BN input (pair dots)": with_pair_dots(fs["fused block, pending BN input"]),
              "fused block, pending BN input, fp32 FMAs": fs["fused block, pending BN input"],
              "oneDNN depthwise conv alone": fs["oneDNN depthwise conv alone"]}
    times = {n: [] for n in fs}
    with torch.no_grad():
        for f in fs.values():
            f()
            f()
        for _ in range(reps):
            for n, f in fs.items():
                t0 = time.perf_counter()
                f()
                times[n].append(time.perf_counter() - t0)
    flops = 2 * N * C * H * H * k * k
    dot = " of bf16 dot peak |" if dot_peak else ""
    print(f"\n{name}, eval {str(dt)[6:]}\n| variant | ms | GFLOP/s | of fp32 FMA peak |{dot}\n"
          f"| --- | ---: | ---: | ---: |{' ---: |' if dot_peak else ''}")
    for n, v in times.items():
        m = statistics.median(v)
        rate = flops / m / 1e9
        dot_pct = f" {rate / dot_peak:.0%} |" if dot_peak else ""
        print(f"| {n} | {m * 1e3:.2f} | {rate:.1f} | {rate / peak:.0%} |{dot_pct}")


if __name__ == "__main__":
    main()
