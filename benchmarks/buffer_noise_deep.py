"""How noisy the per-buffer numerics rule is 32 layers deep: timm's ConvMixer-768/32 in training on 4
images of 56 px (8x8 after the stem), two forward+backward+SGD steps, the BN running statistics judged
per buffer by the DESIGN.md rule with eager NCHW fp32 as the yardstick. Counts the buffers that fail it
for the fused model and for eager PyTorch in channels_last (a second valid fp32 run). The measurement
behind tests/test_convert.py's buffer check (benchmarks/RESULTS.md).

    python benchmarks/buffer_noise_deep.py 0 1 2 3 4     # seeds
"""
import copy
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
import convmixer_kernels as ck  # noqa: E402
from convmixer_kernels.numerics import rule  # noqa: E402
from numerics import randomize_bn  # noqa: E402


def main(seed):
    import timm
    torch.manual_seed(seed)
    orig = randomize_bn(timm.create_model("convmixer_768_32", pretrained=False)).train()
    models = {"same": orig, "cl": copy.deepcopy(orig).to(memory_format=torch.channels_last),
              "fused": ck.convert(orig), "ref": copy.deepcopy(orig).double()}
    x = torch.randn(4, 3, 56, 56)
    inputs = {"ref": x.double(), "cl": x.contiguous(memory_format=torch.channels_last)}
    opts = {k: torch.optim.SGD(m.parameters(), lr=0.1) for k, m in models.items()}
    for step in range(2):
        for k, m in models.items():
            m(inputs.get(k, x)).square().mean().backward()
        for o in opts.values():
            o.step()
            o.zero_grad()
        bufs = {k: dict(m.named_buffers()) for k, m in models.items()}
        stats = [n for n in bufs["ref"] if not n.endswith("num_batches_tracked")]
        line = []
        for who in ("fused", "cl"):
            checks = [rule(n, bufs[who][n], bufs["same"][n], bufs["ref"][n], torch.float32) for n in stats]
            bad = [c.fused_err / c.torch_err for c in checks if not c.ok]
            line.append(f"{'fused' if who == 'fused' else 'eager channels_last'} fails {len(bad)}"
                        + (f" (worst {max(bad):.2f}x)" if bad else ""))
        print(f"seed {seed} step {step}: of {len(stats)} buffers, " + ", ".join(line), flush=True)


if __name__ == "__main__":
    for s in sys.argv[1:] or ["0"]:
        main(int(s))
