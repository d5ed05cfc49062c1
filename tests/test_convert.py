"""Converter on the paper's model and timm's: state_dicts, outputs, gradients, an SGD step, reports."""
import copy

import pytest
import torch
import torch.nn as nn

import convmixer_kernels as ck
from convmixer_kernels.conv_act_bn import FusedConvActBN
from convmixer_kernels.dw_block import FusedDepthwiseBlock
from convmixer_kernels.reference import ConvMixerPaper, Residual
from convmixer_kernels.numerics import rule
from numerics import check_rule, randomize_bn

timm = pytest.importorskip("timm")


def paper_model():
    return randomize_bn(ConvMixerPaper(dim=16, depth=2, kernel_size=5, patch_size=2, n_classes=7, act="gelu"))


def timm_model():
    # The registry's ReLU / k=7 / p=7 model, run on small images (8x8 after the stem).
    return randomize_bn(timm.create_model("convmixer_768_32", pretrained=False))


MODELS = {"paper": (paper_model, (3, 3, 10, 10)), "timm": (timm_model, (4, 3, 56, 56))}


def _count(model, cls):
    return sum(isinstance(m, cls) for m in model.modules())


def _diff(a, b):
    return (a - b).abs().max().item()


@pytest.mark.parametrize("name", MODELS)
def test_state_dicts_identical_and_interchangeable(name):
    make, _ = MODELS[name]
    orig = make()
    conv, report = ck.convert(orig, return_report=True)
    assert not report.skipped
    depth = 2 if name == "paper" else 32
    assert _count(conv, FusedDepthwiseBlock) == depth
    sa, sb = orig.state_dict(), conv.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    conv.load_state_dict(sa, strict=True)
    copy.deepcopy(orig).load_state_dict(sb, strict=True)
    # not inplace: the original is untouched
    assert _count(orig, FusedDepthwiseBlock) == 0


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("training", (True, False))
def test_outputs_gradients_and_sgd_step_match(name, training):
    """Converted vs unconverted, both judged against a float64 copy by the DESIGN.md rule (a deep
    net in training mode with few values per channel amplifies fp32 rounding in either)."""
    make, shape = MODELS[name]
    orig = make().train(training)
    conv = ck.convert(orig)
    ref = copy.deepcopy(orig).double()
    assert conv.training == training
    x = torch.randn(shape)
    cl = copy.deepcopy(orig).to(memory_format=torch.channels_last)  # a second fp32 PyTorch run, for the buffers
    models = {"same": orig, "fused": conv, "ref": ref, "cl": cl}
    opts = {k: torch.optim.SGD(m.parameters(), lr=0.1) for k, m in models.items()}
    for step in range(2):
        inputs = {"ref": x.double(), "cl": x.contiguous(memory_format=torch.channels_last)}
        ys = {k: m(inputs.get(k, x)) for k, m in models.items()}
        check_rule(f"step {step} output", ys["fused"], ys["same"], ys["ref"], torch.float32)
        for y in ys.values():
            y.square().mean().backward()
        # Gradients and updated parameters are judged as one flat vector per model: with few values per
        # BN channel in training, 32 layers deep, eager fp32 itself is ~10% off fp64 on some tensors, and
        # per-tensor maxima of two such noisy runs differ by more than 2x by chance (median ratio ~0.9).
        flat = {k: torch.cat([p.grad.reshape(-1).double() for p in m.parameters()]) for k, m in models.items()}
        check_rule(f"step {step} gradients", flat["fused"], flat["same"], flat["ref"], torch.float32)
        for o in opts.values():
            o.step()
            o.zero_grad()
        flat = {k: torch.cat([p.detach().reshape(-1).double() for p in m.parameters()]) for k, m in models.items()}
        check_rule(f"step {step} parameters", flat["fused"], flat["same"], flat["ref"], torch.float32)
        # The running statistics, per buffer. 32 layers deep after an SGD step (timm's model: 4 images of
        # 8x8 after the stem, 256 values per BN channel) the per-buffer rule compares noise: eager PyTorch
        # in channels_last, judged against eager NCHW as the yardstick, fails it on 0-6 of the 130 statistics buffers
        # (worst 3.6x; five seeds, benchmarks/buffer_noise_deep.py). So there the fused model may fail it on no more
        # buffers than that second PyTorch run does; in eval, and the shallow paper model, on none.
        bufs = {k: dict(m.named_buffers()) for k, m in models.items()}
        stats = [n for n in bufs["ref"] if not n.endswith("num_batches_tracked")]
        failing = {}
        for who in ("fused", "cl"):
            checks = [rule(f"step {step} buffer {n}", bufs[who][n], bufs["same"][n], bufs["ref"][n], torch.float32)
                      for n in stats]
            failing[who] = [str(c) for c in checks if not c.ok]
        allowed = len(failing["cl"]) if name == "timm" and training else 0
        assert len(failing["fused"]) <= allowed, "\n".join(failing["fused"] + ["eager channels_last:"] + failing["cl"])
        counts = {k: [b.item() for n, b in m.named_buffers() if n.endswith("num_batches_tracked")]
                  for k, m in models.items()}
        assert counts["fused"] == counts["ref"], "num_batches_tracked"


def test_inplace_and_idempotent():
    m = paper_model()
    out = ck.convert(m, inplace=True)
    assert out is m and _count(m, FusedDepthwiseBlock) == 2
    again, report = ck.convert(out, return_report=True)
    assert _count(again, FusedDepthwiseBlock) == 2 and not report.skipped


def _dw(conv, act=None, bn=None):
    c = conv.out_channels
    return Residual(nn.Sequential(conv, act or nn.GELU(), bn or nn.BatchNorm2d(c)))


UNFUSABLE = {
    "dilation": _dw(nn.Conv2d(8, 8, 3, groups=8, padding=2, dilation=2)),
    "stride": _dw(nn.Conv2d(8, 8, 3, groups=8, padding=1, stride=2)),
    "padding": _dw(nn.Conv2d(8, 8, 3, groups=8, padding=0)),
    "groups": _dw(nn.Conv2d(8, 8, 3, groups=4, padding=1)),
    "bn features": _dw(nn.Conv2d(8, 8, 3, groups=8, padding=1), bn=nn.BatchNorm2d(16)),
    "activation": _dw(nn.Conv2d(8, 8, 3, groups=8, padding=1), act=nn.SiLU()),
    "even k int padding": _dw(nn.Conv2d(8, 8, 4, groups=8, padding=2)),
    "pointwise activation": nn.Sequential(nn.Conv2d(8, 8, 1), nn.SiLU(), nn.BatchNorm2d(8)),
    "pointwise bn features": nn.Sequential(nn.Conv2d(8, 8, 1), nn.GELU(), nn.BatchNorm2d(4)),
    "conv stride != kernel": nn.Sequential(nn.Conv2d(8, 8, 3, stride=1), nn.GELU(), nn.BatchNorm2d(8)),
    "pointwise padding": nn.Sequential(nn.Conv2d(8, 8, 1, padding=1), nn.GELU(), nn.BatchNorm2d(8)),
    "pointwise groups": nn.Sequential(nn.Conv2d(8, 8, 1, groups=2), nn.GELU(), nn.BatchNorm2d(8)),
}


@pytest.mark.parametrize("case", UNFUSABLE)
def test_unfusable_variants_are_left_and_reported(case):
    model = nn.Sequential(copy.deepcopy(UNFUSABLE[case]))
    x = torch.randn(2, 8, 8, 8)
    model.eval()
    try:
        y_before = model(x)
    except RuntimeError:  # some look-alikes cannot run at all (a residual whose shapes differ)
        y_before = None
    with pytest.warns(UserWarning, match="left these modules unfused"):
        conv, report = ck.convert(model, return_report=True)
    assert report.skipped and not report.fused, report
    assert _count(conv, FusedDepthwiseBlock) == 0 and _count(conv, FusedConvActBN) == 0
    if y_before is not None:
        assert torch.equal(conv(x), y_before)


def test_same_padding_integer_equivalent_is_fused():
    m = nn.Sequential(_dw(nn.Conv2d(8, 8, 5, groups=8, padding=2)))
    conv, report = ck.convert(m, return_report=True)
    assert len(report.fused) == 1 and _count(conv, FusedDepthwiseBlock) == 1


def test_patterns_found_anywhere_in_a_tree():
    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.ModuleDict({"mixer": paper_model()})
            self.extra = nn.Linear(7, 2)

        def forward(self, x):
            return self.extra(self.body["mixer"](x))

    w = Wrapper()
    conv = ck.convert(w)
    assert _count(conv, FusedDepthwiseBlock) == 2
    x = torch.randn(2, 3, 8, 8)
    w.eval()
    conv.eval()
    assert _diff(w(x), conv(x)) < 1e-4
