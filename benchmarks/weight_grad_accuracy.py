"""The pointwise block's and the stem's weight gradient against PyTorch's, by the DESIGN.md rule's yardstick:
for each configuration, the ratio (fused error / PyTorch's own fp32 error, both against float64) of `dweight`
over 8 seeds, median and max. A ratio above 2 on most seeds is a real accuracy loss, not noise.

The configurations are tests/test_fuzz.py's case dicts (fp32 or bf16, GELU, running variance scaled by 1e-3 so that
rstd ~30 amplifies the rounding) at N*H*W from 40 to 8000, eval and training, NCHW and channels_last.
PyTorch splits its weight-gradient sums across threads, so its error depends on the thread count.

    python benchmarks/weight_grad_accuracy.py [--threads 2] [--dtype bfloat16]
"""
import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
import test_fuzz  # noqa: E402  (case_checks: the fuzz's own comparison of one case)

BASE = {'kind': 'stem', 'N': 7, 'C': 21, 'cin': 3, 'H': 4, 'W': 10, 'k': 1, 'patch': 1, 'training': False,
        'track': True, 'dtype': 'float32', 'layout': 'channels_last', 'act': 'gelu', 'momentum': 0.1,
        'affine': False, 'x_offset': 0.0, 'x_scale': 1.0, 'gamma_scale': 1.0, 'var_scale': 0.001, 'steps': 1,
        'seed': 0}
SHAPES = [(1, 4, 10), (7, 4, 10), (8, 8, 8), (16, 10, 10), (20, 20, 20)]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seeds", type=int, default=8)
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import convmixer_kernels
    print(f"package {os.path.dirname(convmixer_kernels.__file__)}, {args.dtype}, {args.threads} threads, "
          f"{args.seeds} seeds")
    print("| block | mode | layout | N*H*W | median ratio | max ratio |")
    print("| --- | --- | --- | ---: | ---: | ---: |")
    for kind, cin in (("stem", 3), ("pw", 32)):
        for training in (False, True):
            for layout in ("channels_last", "nchw"):
                for N, H, W in SHAPES:
                    case = dict(BASE, dtype=args.dtype, kind=kind, cin=cin, training=training, layout=layout,
                                N=N, H=H, W=W)
                    ratios = [c.fused_err / max(c.torch_err, 1e-30)
                              for i in range(args.seeds)
                              for c in test_fuzz.case_checks(dict(case, seed=7919 * i))
                              if c.name.endswith("dweight")]
                    print(f"| {kind} | {'train' if training else 'eval'} | {layout} | {N * H * W} | "
                          f"{statistics.median(ratios):.2f} | {max(ratios):.2f} |", flush=True)


if __name__ == "__main__":
    main()
