"""Fused depthwise block (CPU backend) against the float64 reference, by the DESIGN.md section 4 rule."""
import pytest
import torch

from convmixer_kernels import dw_block
from convmixer_kernels._library import op
from numerics import ACTS, LAYOUTS, make_block_params, make_x, run_block



@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("training", (True, False))
@pytest.mark.parametrize("act", ACTS)
def test_matrix_dtype_layout_act(dtype, layout, training, act):
    x = make_x((2, 5, 7, 7), dtype, layout)
    run_block("dw", x, make_block_params("dw", 5, k=3, dtype=dtype), training, act, steps=2)


@pytest.mark.parametrize("k", (1, 3, 5, 7, 9, 4))
@pytest.mark.parametrize("layout", LAYOUTS)
def test_kernel_sizes(k, layout):
    x = make_x((2, 18, 9, 11), torch.float32, layout)
    run_block("dw", x, make_block_params("dw", 18, k=k), True, "gelu", steps=2)


@pytest.mark.parametrize("C", (3, 5, 130))
@pytest.mark.parametrize("HW", (1, 7, 33))
@pytest.mark.parametrize("layout", LAYOUTS)
def test_odd_shapes(C, HW, layout):
    N = 2 if HW == 1 else 1
    x = make_x((N, C, HW, HW), torch.float32, layout)
    p = make_block_params("dw", C, k=5)
    run_block("dw", x, p, True, "gelu", steps=1)
    run_block("dw", make_x((1, C, HW, HW), torch.float32, layout), p, False, "gelu", steps=1)  # N=1 in eval


@pytest.mark.parametrize("variant", ("momentum_none", "affine_off", "no_running_stats"))
@pytest.mark.parametrize("training", (True, False))
def test_batchnorm_variants(variant, training):
    kw = dict(affine=variant != "affine_off", track=variant != "no_running_stats")
    p = make_block_params("dw", 6, k=3, **kw)
    momentum = None if variant == "momentum_none" else 0.1
    run_block("dw", make_x((2, 6, 5, 5), torch.float32, "nchw"), p, training, "gelu", momentum=momentum, eps=1e-3,
              steps=3)


def test_running_stats_over_many_steps():
    p = make_block_params("dw", 7, k=5)
    run_block("dw", make_x((3, 7, 6, 6), torch.float32, "channels_last"), p, True, "gelu_tanh", steps=4)


def test_large_mean_statistics_are_stable():
    """|mean| >> std: E[g^2]-E[g]^2 in fp32 would cancel; the fused statistics must not."""
    p = make_block_params("dw", 4, k=3)
    p["bias"] = torch.full((4,), 300.0)
    run_block("dw", make_x((2, 4, 8, 8), torch.float32, "nchw") * 0.01, p, True, "relu", steps=1)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("training", (True, False))
@pytest.mark.parametrize("act", ACTS)
def test_gradcheck_fp64(layout, training, act):
    C, k = 3, 3
    x = make_x((2, C, 5, 4), torch.float64, layout).requires_grad_(True)
    w = (torch.randn(C, 1, k, k, dtype=torch.float64) / k).requires_grad_(True)
    b = torch.randn(C, dtype=torch.float64, requires_grad=True)
    g = (1 + 0.3 * torch.randn(C, dtype=torch.float64)).requires_grad_(True)
    be = torch.randn(C, dtype=torch.float64, requires_grad=True)
    rm, rv = torch.randn(C, dtype=torch.float64), torch.rand(C, dtype=torch.float64) + 0.5

    def f(x, w, b, g, be):
        return dw_block(x, w, b, g, be, rm.clone(), rv.clone(), None, training, 0.1, 1e-5, act)

    assert torch.autograd.gradcheck(f, (x, w, b, g, be), eps=1e-6, atol=1e-5)


def _op_args(batch_stats, layout, dtype=torch.float32):
    C = 4
    x = make_x((2, C, 5, 5), dtype, layout)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    w, b = torch.randn(C, 1, 3, 3).to(dtype), torch.randn(C).to(dtype)
    g, be = torch.randn(C, dtype=acc), torch.randn(C, dtype=acc)
    mean = torch.randn(C, dtype=acc) if not batch_stats else torch.empty(0, dtype=acc)
    rstd = torch.rand(C, dtype=acc) + 0.5 if not batch_stats else torch.empty(0, dtype=acc)
    return x, w, b, g, be, mean, rstd


def _input_affine(affine, C=4):
    """(in_center, in_scale, in_shift): the folded BN of a previous pointwise block, or empty (none)."""
    if not affine:
        return torch.empty(0), torch.empty(0), torch.empty(0)
    return torch.randn(C), torch.rand(C) + 0.5, torch.randn(C)


@pytest.mark.parametrize("batch_stats", (True, False))
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("affine", (False, True))
def test_opcheck_forward(batch_stats, layout, affine):
    x, w, b, g, be, mean, rstd = _op_args(batch_stats, layout)
    ce, sc, sh = _input_affine(affine)
    for t in (x, w, b, g, be) + ((ce, sc, sh) if affine else ()):
        t.requires_grad_(True)
    torch.library.opcheck(op("dw_block_forward"),
                          (x, ce, sc, sh, w, b, g, be, mean, rstd, batch_stats, 1e-5, "gelu", "cpu"))


@pytest.mark.parametrize("batch_stats", (True, False))
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("affine", (False, True))
def test_opcheck_backward(batch_stats, layout, affine):
    x, w, b, g, be, mean, rstd = _op_args(False, layout)
    ce, sc, sh = _input_affine(affine)
    dy = torch.randn_like(x)
    torch.library.opcheck(op("dw_block_backward"),
                          (dy, x, ce, sc, sh, w, b, g, mean, rstd, batch_stats, torch.empty(0), "relu", "cpu"))
