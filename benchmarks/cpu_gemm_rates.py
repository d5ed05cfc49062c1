"""The CPU GEMM routes at ConvMixer's pointwise shapes (issue 12), interleaved in one process, median ms:
at::mm (MKL) against oneDNN's matmul as the CPU backend calls it (mkldnn::_linear_pointwise, with and
without the activation post-op), for the forward Z W^T and the backward's dZ = dT W and dW = dT^T Z.

    python benchmarks/cpu_gemm_rates.py [--threads 2] [--reps 15]
"""
import argparse
import statistics
import time

import torch

SHAPES = {"768/32 (M=2048, C=768)": (2048, 768), "256/8 (M=16384, C=256)": (16384, 256)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=15)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    lp = torch.ops.mkldnn._linear_pointwise
    for name, (M, C) in SHAPES.items():
        x, w, b, dT = torch.randn(M, C), torch.randn(C, C), torch.randn(C), torch.randn(M, C)
        fs = {"fwd at::mm": lambda: torch.mm(x, w.t()),
              "fwd oneDNN": lambda: lp(x, w, b, "none", [], ""),
              "fwd oneDNN + gelu post-op": lambda: lp(x, w, b, "gelu", [], "none"),
              "fwd oneDNN + relu post-op": lambda: lp(x, w, b, "relu", [], ""),
              "dZ at::mm": lambda: torch.mm(dT, w),
              "dZ oneDNN": lambda: lp(dT, w.t().contiguous(), None, "none", [], ""),
              "dW at::mm": lambda: torch.mm(dT.t(), x),
              "dW oneDNN (transposed copies)": lambda: lp(dT.t().contiguous(), x.t().contiguous(), None, "none", [], "")}
        times = {n: [] for n in fs}
        for f in fs.values():
            f()
            f()
        for _ in range(a.reps):
            for n, f in fs.items():
                t0 = time.perf_counter()
                f()
                times[n].append(time.perf_counter() - t0)
        print(f"\n{name}, fp32, {a.threads} threads\n| GEMM | ms | GFLOP/s |\n| --- | ---: | ---: |")
        for n, v in times.items():
            m = statistics.median(v)
            print(f"| {n} | {m * 1e3:.2f} | {2 * M * C * C / m / 1e9:.1f} |")


if __name__ == "__main__":
    main()
