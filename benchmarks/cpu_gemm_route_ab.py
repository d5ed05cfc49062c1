"""Whole fused ConvMixer models on the CPU with their fp32 GEMMs in our own kernel (csrc/cpu/sgemm.cpp)
against oneDNN's matmul (`_C.set_cpu_gemm`), alternated call by call in one process: eval (NCHW images, as
users feed them) and a training step (forward + backward), median and best wall ms over --reps calls each.

    python benchmarks/cpu_gemm_route_ab.py [--threads 2] [--reps 7] [--models 256/8,768/32] [--modes eval,train]
"""
import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import convmixer_kernels as ck  # noqa: E402
from convmixer_kernels import _C  # noqa: E402
from convmixer_kernels.reference import ConvMixerPaper  # noqa: E402

# name -> (dim, depth, kernel, patch, act, image size, batch): the bench's CPU model cases
MODELS = {"256/8": (256, 8, 9, 2, "gelu", 32, 64), "768/32": (768, 32, 7, 7, "relu", 224, 2)}
ROUTES = ("own", "onednn")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--models", default="256/8,768/32")
    ap.add_argument("--modes", default="eval,train")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    before = _C.cpu_gemm()
    print(f"{a.threads} threads; GEMMs: {_C.cpu_gemm_library()}")
    print("| model | mode | own ms (median / best) | oneDNN ms (median / best) | oneDNN / own |\n"
          "| --- | --- | ---: | ---: | ---: |")
    try:
        for name in a.models.split(","):
            dim, depth, k, p, act, img, batch = MODELS[name]
            torch.manual_seed(0)
            model = ck.convert(ConvMixerPaper(dim=dim, depth=depth, kernel_size=k, patch_size=p, n_classes=10, act=act))
            x = torch.randn(batch, 3, img, img)
            for mode in a.modes.split(","):
                def call():
                    if mode == "eval":
                        with torch.no_grad():
                            model(x)
                    else:
                        model.zero_grad(set_to_none=True)
                        model(x).sum().backward()
                model.train(mode == "train")
                times = {r: [] for r in ROUTES}
                for r in ROUTES:  # one untimed call each
                    _C.set_cpu_gemm(r)
                    call()
                for i in range(a.reps):
                    for r in (ROUTES if i % 2 == 0 else ROUTES[::-1]):
                        _C.set_cpu_gemm(r)
                        t0 = time.perf_counter()
                        call()
                        times[r].append((time.perf_counter() - t0) * 1e3)
                    print(f"  [{name} {mode} rep {i + 1}/{a.reps}] own {times['own'][-1]:.1f} ms, "
                          f"onednn {times['onednn'][-1]:.1f} ms", file=sys.stderr)
                med = {r: statistics.median(v) for r, v in times.items()}
                print(f"| ConvMixer-{name} | {mode} | {med['own']:.1f} / {min(times['own']):.1f} | "
                      f"{med['onednn']:.1f} / {min(times['onednn']):.1f} | {med['onednn'] / med['own']:.2f}x |")
    finally:
        _C.set_cpu_gemm(before)


if __name__ == "__main__":
    main()
