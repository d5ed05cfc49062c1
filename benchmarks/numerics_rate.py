"""Rate of DESIGN.md section 4 rule failures over random tiny training cases of one block (CPU backend):
the measurement behind issue 11's accuracy fixes (benchmarks/RESULTS.md, "Numerics under fuzzing").

    python benchmarks/numerics_rate.py dw 300      # or pw; prints failures per check and worst ratios
"""
import collections
import sys

import torch

from convmixer_kernels.numerics import compare_block, make_block_params


def main(kind="dw", cases=300):
    torch.set_num_threads(1)
    fails, worst = collections.Counter(), collections.defaultdict(float)
    for seed in range(cases):
        g = torch.Generator().manual_seed(seed)
        r = lambda a, b: int(torch.randint(a, b + 1, (1,), generator=g))  # noqa: E731
        N, H, W, C = r(1, 3), r(1, 4), r(1, 4), r(1, 16)
        N = 2 if N * H * W < 2 else N
        k, cl, act = r(1, 7), r(0, 1), ["gelu", "relu", "gelu_tanh"][r(0, 2)]
        off, sc = [0.0, 3.0][r(0, 1)], [1.0, 0.1][r(0, 1)]
        torch.manual_seed(seed)
        x = off + sc * torch.randn(N, C if kind == "dw" else r(1, 16), H, W)
        if cl:
            x = x.contiguous(memory_format=torch.channels_last)
        for c in compare_block(kind, x, make_block_params(kind, C, k, cin=x.shape[1]), True, act, backend="cpu"):
            key = c.name.split()[-1]
            if c.torch_err > 0:
                worst[key] = max(worst[key], c.fused_err / c.torch_err)
            fails[key] += not c.ok
    print(f"{kind}: {cases} cases (N,H,W <= 3,4,4, C <= 16, k <= 7, x offset 0/3, scale 1/0.1, training)")
    print("rule failures per check:", {k: v for k, v in fails.items() if v})
    print("worst fused/torch error ratio:", {k: round(v, 1) for k, v in worst.items()})


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "dw", int(sys.argv[2]) if len(sys.argv) > 2 else 300)
