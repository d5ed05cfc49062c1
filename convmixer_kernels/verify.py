"""Numerics report: every op, backend, dtype and layout available here against the float64 reference,
by the DESIGN.md section 4 rule. Exit status 1 if any line fails."""
from __future__ import annotations

import argparse
import platform
import sys

import torch

from . import backends
from .benchmark import DTYPES as BENCH_DTYPES
from .numerics import compare_block, compare_cross_layer, make_block_params


def info():
    print(f"python {platform.python_version()}  torch {torch.__version__}  threads {torch.get_num_threads()}")
    try:
        import triton
        print(f"triton {triton.__version__}")
    except ImportError:
        print("triton not installed")
    print("device: " + (torch.cuda.get_device_name() if torch.cuda.is_available() else
                        f"cpu ({platform.processor() or platform.machine()})"))
    for name, (ok, why) in backends.available_backends().items():
        print(f"  {name:<10} {'available' if ok else 'unavailable'}: {why}")


DTYPES = {**BENCH_DTYPES, "fp64": torch.float64}  # the benchmark's names, and fp64 (verified, not timed)


def default_dtypes(device):
    # fp64 too: every backend runs it (the exact path for few values per channel goes through the same
    # kernels), and its bound is atol alone, since PyTorch's fp64 result is the reference.
    return ["fp32", "bf16"] + (["fp16"] if device == "cuda" else []) + ["fp64"]


def _cases(dtypes):
    for dtype in dtypes:
        for layout in ("nchw", "channels_last"):
            for training in (True, False):
                yield dtype, layout, training


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m convmixer_kernels verify", description=__doc__)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--backends", default=None, help="comma list (default: every available kernel backend "
                                                     "that runs on the device)")
    ap.add_argument("--no-emulator", action="store_true",
                    help="leave out cuda_emu (the CUDA kernels emulated on the CPU: slow, a test harness)")
    ap.add_argument("--dtypes", default=None, help="comma list of fp32, bf16, fp16, fp64 (default: fp32, bf16, "
                                                   "fp64, and fp16 on CUDA)")
    args = ap.parse_args(argv)
    dtype_names = args.dtypes.split(",") if args.dtypes else default_dtypes(args.device)
    for n in dtype_names:
        if n not in DTYPES:
            ap.error(f"--dtypes: unknown {n!r} (expected a comma list of {', '.join(DTYPES)})")
    avail = backends.available_backends()
    names = args.backends.split(",") if args.backends else [
        n for n, (ok, _) in avail.items() if ok and n != "reference" and
        args.device in backends.get_backend(n).devices and not (args.no_emulator and n == "cuda_emu")]
    print(f"[verify] device={args.device} backends={names}")
    failures = 0
    torch.manual_seed(0)
    for backend in names:
        for dtype, layout, training in _cases([DTYPES[n] for n in dtype_names]):
            for kind, act, k, patch in (("dw", "gelu", 9, 1), ("dw", "relu", 4, 1), ("pw", "gelu", 1, 1),
                                        ("stem", "gelu_tanh", 1, 2), ("pw>dw", "gelu", 7, 1)):
                cin, C = (3, 24) if kind == "stem" else (24, 24)
                x = torch.randn(2, cin, 10, 10).to(dtype)
                if layout == "channels_last":
                    x = x.contiguous(memory_format=torch.channels_last)
                if kind == "pw>dw":  # cross-layer fusion: the pointwise BN applied on the depthwise load
                    p_pw = make_block_params("pw", C, cin=cin, dtype=dtype)
                    p_dw = make_block_params("dw", C, k=k, dtype=dtype)
                    checks = compare_cross_layer(x.to(args.device), p_pw, p_dw, training, act, steps=2,
                                                 backend=backend)
                else:
                    p = make_block_params(kind, C, k=k, cin=cin, patch=patch, dtype=dtype)
                    checks = compare_block(kind, x.to(args.device), p, training, act, patch=patch, steps=2,
                                           backend=backend)
                bad = [c for c in checks if not c.ok]
                failures += len(bad)
                worst = max(checks, key=lambda c: c.fused_err / c.bound if c.bound else 0.0)
                label = f"{backend:<8} {kind:<5} k={k} {str(dtype).split('.')[-1]:<8} {layout:<13} " \
                        f"{'train' if training else 'eval':<5} {act:<9}"
                print(f"  {'PASS' if not bad else 'FAIL'} {label} worst: {worst}")
                for c in bad:
                    print(f"       {c}")
    print(f"[verify] {'all checks passed' if not failures else f'{failures} check(s) FAILED'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
