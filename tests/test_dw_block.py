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


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
@pytest.mark.parametrize("k", (9, 4))
def test_channels_last_eval_work_split(dtype, k):
    """The channels_last eval kernel (csrc/cpu/dw_block.cpp, eval_ring_k) splits a call into channel blocks
    when a ring of k padded rows of every channel would not fit its L2 budget, and into row chunks when
    there are fewer images than threads; W = 150 gives ten 16-pixel tiles, the last partial, and C = 150
    two channel blocks (9 and 1 groups of 16 lanes, the last with 6 valid lanes). Checked plain and with
    the previous block's BN applied on the load (the cross-layer pair)."""
    from numerics import run_cross_layer
    x = make_x((1, 150, 5, 150), dtype, "channels_last")
    p = make_block_params("dw", 150, k=k, dtype=dtype)
    run_block("dw", x, p, False, "relu", steps=1)
    x_pw = make_x((1, 6, 5, 150), dtype, "channels_last")
    run_cross_layer(x_pw, make_block_params("pw", 150, cin=6, dtype=dtype), p, False, "gelu", steps=1)


@pytest.mark.parametrize("act", ACTS)
def test_channels_last_training_fp32_ring(act):
    """The channels_last training backward in fp32 (csrc/cpu/dw_block.cpp, ring_backward_k), which the small
    shapes above do not reach: with at most exact_training_max_count values per channel a call runs in double.
    2*17*19 = 646 values; C = 20 leaves the last channel group partial. Plain and with the previous block's BN
    applied on the load, whose gradients take the input-affine sums."""
    from convmixer_kernels import _C
    from numerics import run_cross_layer
    x = make_x((2, 20, 17, 19), torch.float32, "channels_last")
    assert 2 * 17 * 19 > _C.exact_training_max_count()
    p = make_block_params("dw", 20, k=7)
    run_block("dw", x, p, True, act, steps=2)
    run_cross_layer(make_x((2, 6, 17, 19), torch.float32, "channels_last"), make_block_params("pw", 20, cin=6), p,
                    True, act, steps=2)


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


# bf16 channels_last eval can run AVX512_BF16 pair dots where the build has them (csrc/cpu/dw_block.cpp,
# conv_tiles_pairs_k; off by default, measured slower so far); off, it takes the fp32 FMAs. Both against float64,
# k odd and even (a zero tap past an odd k), C with a partial 16-lane group, with and without the previous
# block's pending BN (the input affine rounded to bf16 on the pair path).
_pair_dots = pytest.mark.skipif(not __import__("convmixer_kernels")._C.cpu_bf16_pair_dots_built(),
                                reason="this build's CPU target has no AVX512_BF16 dot products")


@pytest.fixture
def pair_dots_switch():
    from convmixer_kernels import _C
    before = _C.cpu_bf16_pair_dots()
    yield _C.set_cpu_bf16_pair_dots
    _C.set_cpu_bf16_pair_dots(before)


@_pair_dots
@pytest.mark.parametrize("pair_dots", (True, False))
@pytest.mark.parametrize("k", (1, 2, 3, 7, 8, 9))
@pytest.mark.parametrize("C", (16, 70))
def test_bf16_eval_pair_dots(pair_dots_switch, pair_dots, k, C):
    from numerics import run_cross_layer
    pair_dots_switch(pair_dots)
    x = make_x((2, C, 5, 11), torch.bfloat16, "channels_last")
    run_block("dw", x, make_block_params("dw", C, k=k, dtype=torch.bfloat16), False, "gelu", steps=1)
    x = make_x((2, 4, 6, 9), torch.bfloat16, "channels_last")
    p_pw = make_block_params("pw", C, cin=4, dtype=torch.bfloat16)
    run_cross_layer(x, p_pw, make_block_params("dw", C, k=k, dtype=torch.bfloat16), False, "gelu", steps=1)


@_pair_dots
def test_bf16_eval_pair_dots_switch_changes_the_path(pair_dots_switch):
    """The switch reaches the kernel: with a pending BN input the pair path rounds u to bf16 and sums taps
    in pairs, so its output differs from the fp32-FMA path's in some elements (both pass the rule above)."""
    from convmixer_kernels import _C
    from convmixer_kernels._library import PendingBN
    torch.manual_seed(0)
    C = 70
    x = make_x((2, C, 9, 9), torch.bfloat16, "channels_last")
    p = make_block_params("dw", C, k=7, dtype=torch.bfloat16)
    pend = PendingBN(x, torch.randn(C), torch.rand(C) + 0.5, torch.randn(C))
    ys = []
    for on in (True, False):
        pair_dots_switch(on)
        assert _C.cpu_bf16_pair_dots() == on
        ys.append(dw_block(pend, p["weight"], p["bias"], p["gamma"], p["beta"], p["running_mean"],
                           p["running_var"], None, False, act="gelu", backend="cpu"))
    assert ys[0].is_contiguous(memory_format=torch.channels_last)
    assert not torch.equal(ys[0], ys[1])
    torch.testing.assert_close(ys[0].float(), ys[1].float(), atol=0.1, rtol=0.05)
