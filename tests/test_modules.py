"""Modules: drop-in equivalence with the unfused layers, timm's state_dict keys, torch.compile."""
import copy

import pytest
import torch
import torch.nn as nn

import convmixer_kernels as ck
from convmixer_kernels.reference import Residual, make_act

from numerics import randomize_bn  # noqa: E402

timm = pytest.importorskip("timm")


def _max_diff(a, b):
    return (a - b).abs().max().item()


@pytest.mark.parametrize("act", ("gelu", "gelu_tanh", "relu"))
@pytest.mark.parametrize("training", (True, False))
def test_fused_depthwise_block_is_drop_in(act, training):
    ref = Residual(nn.Sequential(nn.Conv2d(8, 8, 5, groups=8, padding="same"), make_act(act), nn.BatchNorm2d(8)))
    randomize_bn(ref).train(training)
    fused = ck.FusedDepthwiseBlock(8, 5, act)
    fused.load_state_dict(ref.state_dict(), strict=True)
    fused.train(training)
    x = torch.randn(2, 8, 6, 6)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = ref(xa), fused(xb)
    assert _max_diff(ya, yb) < 1e-4
    ya.square().sum().backward()
    yb.square().sum().backward()
    assert _max_diff(xa.grad, xb.grad) < 1e-4
    for (n, pa), (_, pb) in zip(ref.named_parameters(), fused.named_parameters()):
        assert _max_diff(pa.grad, pb.grad) < 1e-3, n
    for (n, ba), (_, bb) in zip(ref.named_buffers(), fused.named_buffers()):
        assert _max_diff(ba.float(), bb.float()) < 1e-5, n


def test_fused_conv_act_bn_is_drop_in():
    ref = nn.Sequential(nn.Conv2d(3, 8, 2, stride=2), nn.GELU(), nn.BatchNorm2d(8))
    fused = ck.FusedConvActBN(3, 8, 2, "gelu")
    assert set(fused.state_dict()) == set(ref.state_dict())
    fused.load_state_dict(randomize_bn(ref).state_dict())
    x = torch.randn(2, 3, 9, 9)
    for mode in (True, False):
        ref.train(mode)
        fused.train(mode)
        assert _max_diff(ref(x), fused(x)) < 1e-4


def test_convmixer_state_dict_keys_are_timms():
    ours = ck.ConvMixer(dim=32, depth=3, kernel_size=5, patch_size=2, num_classes=10)
    theirs = timm.models.convmixer.ConvMixer(dim=32, depth=3, kernel_size=5, patch_size=2, num_classes=10)
    assert list(ours.state_dict().keys()) == list(theirs.state_dict().keys())
    randomize_bn(theirs)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(2, 3, 16, 16)
    ours.eval()
    theirs.eval()
    assert _max_diff(ours(x), theirs(x)) < 1e-4


def test_timm_registry_checkpoint_loads_strict():
    theirs = timm.create_model("convmixer_768_32", pretrained=False)
    ours = ck.ConvMixer(dim=768, depth=32, kernel_size=7, patch_size=7, act="relu")
    ours.load_state_dict(theirs.state_dict(), strict=True)


def test_convmixer_reference_backend_runs_unfused_layers():
    m = ck.ConvMixer(dim=16, depth=2, kernel_size=3, patch_size=2, num_classes=5)
    ref = ck.set_backend(copy.deepcopy(m), "reference")
    x = torch.randn(2, 3, 8, 8)
    assert _max_diff(m(x), ref(x)) < 1e-4


def test_channels_last_model():
    m = randomize_bn(ck.ConvMixer(dim=16, depth=2, kernel_size=5, patch_size=2, num_classes=5))
    x = torch.randn(2, 3, 12, 12)
    y_nchw = m(x)
    m_cl = copy.deepcopy(m).to(memory_format=torch.channels_last)
    y_cl = m_cl(x.contiguous(memory_format=torch.channels_last))
    assert _max_diff(y_nchw, y_cl) < 1e-4


def test_autocast_behaves_like_unfused_layers():
    """Under CPU autocast (bf16) the fused block's conv runs in bf16 and BN stays fp32, as unfused."""
    ref = randomize_bn(nn.Sequential(nn.Conv2d(8, 8, 1), nn.GELU(), nn.BatchNorm2d(8))).eval()
    fused = ck.FusedConvActBN(8, 8, 1, "gelu")
    fused.load_state_dict(ref.state_dict())
    fused.eval()
    x = torch.randn(2, 8, 5, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ya, yb = ref(x), fused(x)
    assert ya.dtype == yb.dtype == torch.bfloat16
    assert _max_diff(ya.float(), yb.float()) < 5e-2


@pytest.mark.slow
@pytest.mark.parametrize("training", (False, True))
def test_compile_fullgraph_matches_eager(training):
    torch._dynamo.reset()
    m = randomize_bn(ck.ConvMixer(dim=16, depth=2, kernel_size=5, patch_size=2, num_classes=5, act="gelu"))
    m.train(training)
    mc = copy.deepcopy(m)
    compiled = torch.compile(mc, fullgraph=True)
    x = torch.randn(4, 3, 8, 8)
    y_eager = m(x)
    y_comp = compiled(x)
    assert _max_diff(y_eager, y_comp) < 1e-4
    if training:
        y_eager.square().sum().backward()
        y_comp.square().sum().backward()
        for (n, pa), (_, pb) in zip(m.named_parameters(), mc.named_parameters()):
            assert _max_diff(pa.grad, pb.grad) < 1e-3, n
        for (n, ba), (_, bb) in zip(m.named_buffers(), mc.named_buffers()):
            assert _max_diff(ba.float(), bb.float()) < 1e-5, n
