"""Fused CPU models against the runtimes CPU users pick (issue 12): the model cases of
`python -m convmixer_kernels bench` in eval, with only the peers (convmixer_kernels/cpu_peers.py: ONNX Runtime,
OpenVINO, torch.compile with freezing), eager PyTorch and the fused model (NCHW input as users feed it, and
channels_last), at one thread count, interleaved repetitions in one process, median ms.

    python benchmarks/cpu_peers.py [--threads 2] [--reps 5] [--models 256/8,768/32] [--no-compile] [--bf16]
                                   [--out bench_peers]

--bf16 adds the bf16 rows (the fused model and torch.compile in bf16, OpenVINO with its bf16 precision hint,
ONNX Runtime in fp32). The CSV and the table are the benchmark's (bench_cpu.csv under --out).
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from convmixer_kernels import benchmark  # noqa: E402

MODELS = {"256/8": "model", "768/32": "model768", "1536/20": "model1536"}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--models", default="256/8,768/32", help=f"comma list of {', '.join(MODELS)}")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--bf16", action="store_true", help="also the bf16 rows")
    ap.add_argument("--out", default="bench_peers")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    variants = ["eager_nchw", "eager_channels_last", "onnxruntime", "openvino", "fused_cpu_nchw", "fused_cpu"]
    if not a.no_compile:
        variants.insert(2, "torch_compile_freezing")
    return benchmark.main(["--cases", ",".join(MODELS[m] for m in a.models.split(",")), "--modes", "eval",
                           "--dtypes", "fp32,bf16" if a.bf16 else "fp32", "--reps", str(a.reps),
                           "--fused-layouts", "nchw,channels_last", "--variants", ",".join(variants),
                           "--out", a.out] + (["--no-compile"] if a.no_compile else []))


if __name__ == "__main__":
    sys.exit(main())
