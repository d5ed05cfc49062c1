"""Fused conv-act-BN (pointwise conv and patch stem, CPU backend) against the float64 reference."""
import dataclasses

import pytest
import torch

from convmixer_kernels import conv_act_bn
from convmixer_kernels._library import op
from numerics import ACTS, LAYOUTS, make_block_params, make_x, run_block



@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("training", (True, False))
@pytest.mark.parametrize("act", ACTS)
def test_pointwise_matrix(dtype, layout, training, act):
    x = make_x((2, 5, 7, 7), dtype, layout)
    run_block("pw", x, make_block_params("pw", 6, cin=5, dtype=dtype), training, act, steps=2)


@pytest.mark.parametrize("patch,HW", ((2, 8), (3, 7), (7, 14)))
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("training", (True, False))
def test_stem(patch, HW, layout, training):
    x = make_x((2, 3, HW, HW), torch.float32, layout)
    run_block("stem", x, make_block_params("stem", 10, cin=3, patch=patch), training, "gelu", patch=patch, steps=2)


@pytest.mark.parametrize("shape,patch", (((17, 3, 16, 3), 2), ((2, 5, 9, 10), 3), ((3, 4, 7, 7), 7)))
@pytest.mark.parametrize("channels_last", (False, True))
def test_reference_patch_conv_is_the_strided_conv(shape, patch, channels_last):
    """The reference stem's patch_conv (a matmul over patches, which keeps the numerics rule's yardstick
    off PyTorch 2.14.1's broken bf16 CPU conv for cin=3, k=s=2, one output column) is F.conv2d with
    stride = kernel, values and gradients, in float64."""
    from convmixer_kernels.reference import patch_conv
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    w = torch.randn(6, shape[1], patch, patch, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, requires_grad=True)
    want, got = torch.nn.functional.conv2d(x, w, b, stride=patch), patch_conv(x, w, b, patch)
    torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-13)
    dy = torch.randn_like(want)
    for g, h in zip(torch.autograd.grad(got, (x, w, b), dy), torch.autograd.grad(want, (x, w, b), dy)):
        torch.testing.assert_close(g, h, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("save_t", (True, False))
@pytest.mark.parametrize("patch", (1, 2))
@pytest.mark.parametrize("layout", LAYOUTS)
def test_saved_and_recomputed_t(save_t, patch, layout):
    x = make_x((2, 4, 6, 6), torch.float32, layout)
    run_block("pw", x, make_block_params("pw", 5, cin=4, patch=patch), True, "relu", patch=patch, save_t=save_t,
              steps=2)


@pytest.mark.parametrize("C", (3, 5, 130))
@pytest.mark.parametrize("HW", (1, 7, 33))
@pytest.mark.parametrize("layout", LAYOUTS)
def test_odd_shapes(C, HW, layout):
    N = 2 if HW == 1 else 1
    p = make_block_params("pw", C, cin=C)
    run_block("pw", make_x((N, C, HW, HW), torch.float32, layout), p, True, "gelu")
    run_block("pw", make_x((1, C, HW, HW), torch.float32, layout), p, False, "gelu")


@pytest.mark.parametrize("variant", ("momentum_none", "affine_off", "no_running_stats"))
@pytest.mark.parametrize("training", (True, False))
def test_batchnorm_variants(variant, training):
    kw = dict(affine=variant != "affine_off", track=variant != "no_running_stats")
    p = make_block_params("pw", 6, cin=4, **kw)
    momentum = None if variant == "momentum_none" else 0.1
    run_block("pw", make_x((2, 4, 5, 5), torch.float32, "channels_last"), p, training, "gelu",
              momentum=momentum, eps=1e-3, steps=3)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("training", (True, False))
@pytest.mark.parametrize("patch,save_t", ((1, True), (1, False), (2, False)))
@pytest.mark.parametrize("act", ACTS)
def test_gradcheck_fp64(layout, training, patch, save_t, act):
    cin, cout = 3, 4
    x = make_x((2, cin, 4, 5), torch.float64, layout).requires_grad_(True)
    w = (torch.randn(cout, cin, patch, patch, dtype=torch.float64) / 2).requires_grad_(True)
    b = torch.randn(cout, dtype=torch.float64, requires_grad=True)
    g = (1 + 0.3 * torch.randn(cout, dtype=torch.float64)).requires_grad_(True)
    be = torch.randn(cout, dtype=torch.float64, requires_grad=True)
    rm, rv = torch.randn(cout, dtype=torch.float64), torch.rand(cout, dtype=torch.float64) + 0.5

    def f(x, w, b, g, be):
        return conv_act_bn(x, w, b, g, be, rm.clone(), rv.clone(), None, training, 0.1, 1e-5, act, patch,
                           save_t=save_t)

    assert torch.autograd.gradcheck(f, (x, w, b, g, be), eps=1e-6, atol=1e-5)


def _op_args(batch_stats, layout, patch):
    cin, cout = 3, 4
    x = make_x((2, cin, 6, 6), torch.float32, layout)
    w, b = torch.randn(cout, cin, patch, patch), torch.randn(cout)
    g, be = torch.randn(cout), torch.randn(cout)
    mean = torch.randn(cout) if not batch_stats else torch.empty(0)
    rstd = torch.rand(cout) + 0.5 if not batch_stats else torch.empty(0)
    return x, w, b, g, be, mean, rstd


@pytest.mark.parametrize("batch_stats", (True, False))
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("patch,save_t", ((1, True), (2, False)))
@pytest.mark.parametrize("apply_bn", (True, False))
def test_opcheck_forward(batch_stats, layout, patch, save_t, apply_bn):
    x, w, b, g, be, mean, rstd = _op_args(batch_stats, layout, patch)
    for t in (x, w, b, g, be):
        t.requires_grad_(True)
    torch.library.opcheck(op("conv_act_bn_forward"),
                          (x, w, b, g, be, mean, rstd, batch_stats, 1e-5, "gelu", patch, save_t, apply_bn, "cpu"))


@pytest.mark.parametrize("batch_stats", (True, False))
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("patch,save_t", ((1, True), (2, False)))
@pytest.mark.parametrize("apply_bn,need_dx", ((True, True), (False, True), (True, False)))
def test_opcheck_backward(batch_stats, layout, patch, save_t, apply_bn, need_dx):
    x, w, b, g, be, mean, rstd = _op_args(False, layout, patch)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    dy = torch.randn(2, 4, 6 // patch, 6 // patch).contiguous(memory_format=fmt)
    t = torch.randn_like(dy) if save_t else torch.empty(0)
    dmean, drstd = (torch.randn(4), torch.randn(4)) if not apply_bn else (torch.empty(0), torch.empty(0))
    torch.library.opcheck(op("conv_act_bn_backward"),
                          (dy, x, w, b, g, mean, rstd, t, dmean, drstd, batch_stats, "gelu_tanh", patch, apply_bn,
                           need_dx, "cpu"))


def test_backward_skips_dx_when_the_input_needs_no_grad(monkeypatch):
    """The stem's images need no gradient: the backward is asked not to form dZ = dT W, and the
    parameter gradients are unchanged."""
    from convmixer_kernels import backends
    b = backends.get_backend("cpu")
    seen = []

    def spy_backward(*a):
        seen.append(a[-1])  # need_dx
        return b.conv_act_bn_backward(*a)

    monkeypatch.setitem(backends._LOADED, "cpu", dataclasses.replace(b, conv_act_bn_backward=spy_backward))
    p = make_block_params("stem", 4, cin=3, patch=2)
    grads = {}
    for needs in (False, True):
        x = torch.randn(2, 3, 9, 9, generator=torch.Generator().manual_seed(1)).requires_grad_(needs)
        w, bias = p["weight"].clone().requires_grad_(), p["bias"].clone().requires_grad_()
        conv_act_bn(x, w, bias, p["gamma"], p["beta"], training=True, patch=2, backend="cpu").square().sum().backward()
        grads[needs] = (w.grad, bias.grad)
        assert (x.grad is not None) == needs
    assert seen == [False, True]
    for a, c in zip(grads[False], grads[True]):
        torch.testing.assert_close(a, c, rtol=0, atol=0)
