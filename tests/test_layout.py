"""The layout a fused model runs in on the CPU (issue 12): its stem makes an NCHW input channels_last,
the kernels' fast layout, so every block after it runs channels_last; the logits are those of the
unconverted model. A fused block called on its own keeps its input's layout."""
import pytest
import torch

import convmixer_kernels as ck
from convmixer_kernels.reference import ConvMixerPaper


def _first_block_input_layout(model, block):
    seen = {}

    def hook(_m, args):
        x = args[0]
        g = x.g if isinstance(x, ck.PendingBN) else x
        seen["channels_last"] = g.is_contiguous(memory_format=torch.channels_last) and not g.is_contiguous()
    handle = block.register_forward_pre_hook(hook)
    return seen, handle


@pytest.mark.parametrize("training", (False, True))
def test_convmixer_runs_channels_last_on_nchw_input(training):
    torch.manual_seed(0)
    model = ck.ConvMixer(16, 2, kernel_size=3, patch_size=2, num_classes=5, backend="cpu").train(training)
    ref = ck.ConvMixer(16, 2, kernel_size=3, patch_size=2, num_classes=5, backend="reference").train(training)
    ref.load_state_dict(model.state_dict())
    x = torch.randn(4, 3, 16, 16)
    assert x.is_contiguous()
    seen, handle = _first_block_input_layout(model, model.blocks[0][0])
    y = model(x)
    handle.remove()
    assert seen["channels_last"], "the first depthwise block did not receive a channels_last input"
    torch.testing.assert_close(y, ref(x), rtol=1e-4, atol=1e-5)
    if training:
        y.square().sum().backward()  # the backward runs through the layout change


def test_channels_last_cpu_off_keeps_nchw():
    model = ck.ConvMixer(8, 1, kernel_size=3, patch_size=2, num_classes=3, backend="cpu").eval()
    model.stem.channels_last_cpu = False
    seen, handle = _first_block_input_layout(model, model.blocks[0][0])
    model(torch.randn(2, 3, 8, 8))
    handle.remove()
    assert not seen["channels_last"]


@pytest.mark.parametrize("layout", ("nchw", "channels_last"))
def test_standalone_blocks_keep_their_input_layout(layout):
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = torch.randn(2, 3, 8, 8).contiguous(memory_format=fmt)
    for m in (ck.FusedConvActBN(3, 8, patch_size=2, backend="cpu"), ck.FusedConvActBN(3, 8, backend="cpu"),
              ck.FusedDepthwiseBlock(3, 3, backend="cpu")):
        y = m.eval()(x)
        assert y.is_contiguous(memory_format=fmt), type(m).__name__


def test_converted_paper_model_runs_channels_last():
    torch.manual_seed(0)
    paper = ConvMixerPaper(16, 2, kernel_size=3, patch_size=2, n_classes=5).eval()
    fused = ck.convert(paper, backend="cpu")
    assert fused.channels_last_cpu  # the flat Sequential starts with the stem
    seen, handle = _first_block_input_layout(fused, fused[3])
    x = torch.randn(2, 3, 16, 16)
    y = fused(x)
    handle.remove()
    assert seen["channels_last"]
    torch.testing.assert_close(y, paper(x), rtol=1e-4, atol=1e-5)
    off = ck.convert(paper, backend="cpu", cpu_channels_last=False)
    assert not off.channels_last_cpu


def test_converted_timm_model_runs_channels_last():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.models.convmixer.ConvMixer(dim=16, depth=2, kernel_size=3, patch_size=2, num_classes=5).eval()
    fused = ck.convert(model, backend="cpu")
    assert fused.stem.channels_last_cpu
    x = torch.randn(2, 3, 16, 16)
    feats = fused.forward_features(x)
    assert feats.is_contiguous(memory_format=torch.channels_last) and not feats.is_contiguous()
    torch.testing.assert_close(fused(x), model(x), rtol=1e-4, atol=1e-5)


def test_layout_change_is_only_on_the_cpu():
    from convmixer_kernels._library import model_layout
    x = torch.randn(2, 3, 4, 4)
    assert model_layout(x, True).is_contiguous(memory_format=torch.channels_last)
    assert model_layout(x, False) is x
    assert model_layout(x.to(memory_format=torch.channels_last), True).is_contiguous(
        memory_format=torch.channels_last)
    assert model_layout(torch.randn(3, 4), True).dim() == 2  # not an image: untouched
