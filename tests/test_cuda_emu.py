"""CUDA backend kernels run on the CPU through the host emulator (backend="cuda_emu"): the sources of
csrc/cuda/*.cu compiled as host C++ against csrc/cuda_emu/cuda_emu.h, every block a team of real
threads meeting at real barriers, with warp shuffles exchanged through per-warp slots. Each case
goes through the op layer and is checked against the float64 reference by the DESIGN.md section 4
rule (output, every gradient, running statistics).

Emulated launch geometry (csrc/cuda/launch_common.h): 32-thread blocks, 4 channel lanes per
channels_last reduction block, at most 3 pixel splits, 4x4 backward tiles of 2 channels (1 in NCHW).
So C = 3, 5, 130 and H = W = 1, 7, 9 leave channel-group, split and tile remainders; C = 8 (fp32) and
C = 16 (fp16/bf16) in channels_last take the 16-byte pack path of the apply kernel.
Emulated threads are OS threads: shapes are tiny and the matrix is chosen, not crossed.
"""
import copy

import pytest
import torch

import convmixer_kernels
from convmixer_kernels import backends
from convmixer_kernels._library import op
from numerics import (RECENTRING_CASES, check_few_values_run_in_float64, make_block_params, recentring_case,
                      run_block, run_cross_layer)

_available, _reason = backends.available_backends()["cuda_emu"]
if not _available:
    pytest.skip(f"cuda_emu backend unavailable: {_reason}", allow_module_level=True)

ACTS = ("gelu", "gelu_tanh", "relu")
LAYOUTS = ("nchw", "channels_last")


def make_x(shape, dtype, layout):
    x = torch.randn(shape).to(dtype)
    return x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x


def emu(kind, x, p, training, act, **kw):
    run_block(kind, x, p, training, act, backend="cuda_emu", **kw)


# --- depthwise block --------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("training", (True, False))
@pytest.mark.parametrize("act", ACTS)
def test_dw_fp32_acts(layout, training, act):
    emu("dw", make_x((2, 5, 7, 7), torch.float32, layout), make_block_params("dw", 5, k=3), training, act)


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16))
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("training", (True, False))
def test_dw_half_types(dtype, layout, training):
    # C = 16: the channels_last apply kernel moves 8 fp16/bf16 channels per 16-byte pack
    emu("dw", make_x((2, 16, 5, 5), dtype, layout), make_block_params("dw", 16, k=3, dtype=dtype), training,
        "gelu_tanh")


@pytest.mark.parametrize("k", (1, 3, 5, 7, 9, 4))
@pytest.mark.parametrize("layout", LAYOUTS)
def test_dw_kernel_sizes(k, layout):
    emu("dw", make_x((2, 3, 9, 7), torch.float32, layout), make_block_params("dw", 3, k=k), True, "gelu")


@pytest.mark.parametrize("C,HW", ((3, 9), (5, 1), (130, 5), (8, 7)))
@pytest.mark.parametrize("layout", LAYOUTS)
def test_dw_tile_remainders(C, HW, layout):
    N = 2 if HW == 1 else 1
    p = make_block_params("dw", C, k=3 if C > 100 else 5)
    emu("dw", make_x((N, C, HW, HW), torch.float32, layout), p, True, "relu")
    emu("dw", make_x((1, C, HW, HW), torch.float32, layout), p, False, "relu")  # N = 1 in eval


def test_dw_large_mean_statistics_are_stable():
    p = make_block_params("dw", 4, k=3)
    p["bias"] = torch.full((4,), 300.0)
    emu("dw", make_x((2, 4, 8, 8), torch.float32, "nchw") * 0.01, p, True, "relu")


@pytest.mark.parametrize("kind,offset,scale,seed", RECENTRING_CASES)
def test_training_backward_recentres_ghat(kind, offset, scale, seed):
    """|mean| >> std above 512 values per channel: pass 1 measures sum ghat and launch_recentre_sums centres
    ghat on the exact mean of g (tests/numerics.py RECENTRING_CASES)."""
    x, p, patch = recentring_case(kind, offset, scale, seed)
    emu(kind, x, p, True, "gelu", patch=patch)


# --- pointwise conv and stem ------------------------------------------------------------------------

@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("training", (True, False))
@pytest.mark.parametrize("act", ACTS)
def test_pw_fp32_acts(layout, training, act):
    emu("pw", make_x((2, 5, 7, 7), torch.float32, layout), make_block_params("pw", 6, cin=5), training, act)


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16))
@pytest.mark.parametrize("layout", LAYOUTS)
def test_pw_half_types(dtype, layout):
    emu("pw", make_x((2, 5, 5, 5), dtype, layout), make_block_params("pw", 6, cin=5, dtype=dtype), True, "gelu")


@pytest.mark.parametrize("patch,HW", ((2, 8), (3, 7)))
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("training", (True, False))
def test_stem(patch, HW, layout, training):
    emu("stem", make_x((2, 3, HW, HW), torch.float32, layout), make_block_params("stem", 10, cin=3, patch=patch),
        training, "gelu", patch=patch)


@pytest.mark.parametrize("save_t", (True, False))
@pytest.mark.parametrize("layout", LAYOUTS)
def test_pw_saved_and_recomputed_t(save_t, layout):
    emu("pw", make_x((2, 4, 6, 6), torch.float32, layout), make_block_params("pw", 5, cin=4), True, "relu",
        save_t=save_t)


@pytest.mark.parametrize("C,HW", ((3, 9), (5, 1), (130, 5)))
@pytest.mark.parametrize("layout", LAYOUTS)
def test_pw_remainders(C, HW, layout):
    N = 2 if HW == 1 else 1
    p = make_block_params("pw", C, cin=4)
    emu("pw", make_x((N, 4, HW, HW), torch.float32, layout), p, True, "gelu")
    emu("pw", make_x((1, 4, HW, HW), torch.float32, layout), p, False, "gelu")


# --- BatchNorm variants (both blocks) ---------------------------------------------------------------

@pytest.mark.parametrize("variant", ("momentum_none", "affine_off", "no_running_stats"))
@pytest.mark.parametrize("training", (True, False))
@pytest.mark.parametrize("kind", ("dw", "pw"))
def test_batchnorm_variants(variant, training, kind):
    kw = dict(affine=variant != "affine_off", track=variant != "no_running_stats")
    p = make_block_params(kind, 6, k=3, cin=4, **kw) if kind == "pw" else make_block_params("dw", 4, k=3, **kw)
    momentum = None if variant == "momentum_none" else 0.1
    emu(kind, make_x((2, 4, 5, 5), torch.float32, "channels_last"), p, training, "gelu", momentum=momentum, eps=1e-3,
        steps=2)


# --- fp64, and the exact path of training with few values per channel ------------------------------
# fp64 inputs run the generic kernels in fp64 (kernel_api.h). fp32/bf16/fp16 training with at most
# _C.exact_training_max_count() values per channel runs the same fp64 kernels on fp64 copies and rounds once,
# as the CPU and Triton backends do; the fp32 kernels then train only above that count (tested below).

@pytest.mark.parametrize("kind", ("dw", "pw", "stem"))
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("training", (True, False))
def test_fp64(kind, layout, training):
    dt, patch = torch.float64, 2 if kind == "stem" else 1
    cin = 3 if kind == "stem" else 5
    p = make_block_params(kind, 5, k=3 if kind == "dw" else patch, cin=cin, patch=patch, dtype=dt)
    emu(kind, make_x((2, cin, 6 * patch, 7 * patch), dt, layout), p, training, "gelu", patch=patch)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_dw_fp64_generic_backward_tiles(layout):
    # k = 11 > 9: the generic kernels; channels_last with 5 channels: fp64 halves the backward tile's channel
    # lanes (2 -> 1 under emulation), so channel-group remainders of both tilings occur
    dt = torch.float64
    emu("dw", make_x((2, 5, 9, 7), dt, layout), make_block_params("dw", 5, k=11, dtype=dt), True, "relu")


@pytest.mark.parametrize("training", (True, False))
def test_gradcheck_fp64(training):
    # gradcheck's fast mode (a random projection of the Jacobian) on a tiny shape: the full Jacobian of
    # (2, 3, 4, 5) took 160 s per block under emulation (every launch runs its blocks' threads as OS threads)
    C, k = 3, 3
    x = make_x((2, C, 3, 4), torch.float64, "channels_last").requires_grad_(True)
    w = (torch.randn(C, 1, k, k, dtype=torch.float64) / k).requires_grad_(True)
    b = torch.randn(C, dtype=torch.float64, requires_grad=True)
    g = (1 + 0.3 * torch.randn(C, dtype=torch.float64)).requires_grad_(True)
    be = torch.randn(C, dtype=torch.float64, requires_grad=True)
    pw_w = (torch.randn(C, 2, 1, 1, dtype=torch.float64) / 2).requires_grad_(True)
    x_pw = torch.randn(2, 2, 3, 4, dtype=torch.float64, requires_grad=True)
    rm, rv = torch.randn(C, dtype=torch.float64), torch.rand(C, dtype=torch.float64) + 0.5

    def dw(x, w, b, g, be):
        return convmixer_kernels.dw_block(x, w, b, g, be, rm.clone(), rv.clone(), None, training, 0.1, 1e-5, "gelu",
                                          backend="cuda_emu")

    def pw(x, w, b, g, be):
        return convmixer_kernels.conv_act_bn(x, w, b, g, be, rm.clone(), rv.clone(), None, training, 0.1, 1e-5,
                                             "gelu_tanh", backend="cuda_emu")

    assert torch.autograd.gradcheck(dw, (x, w, b, g, be), eps=1e-6, atol=1e-5, fast_mode=True)
    assert torch.autograd.gradcheck(pw, (x_pw, pw_w, b, g, be), eps=1e-6, atol=1e-5, fast_mode=True)


@pytest.mark.parametrize("kind,layout", (("dw", "channels_last"), ("dw", "nchw"), ("pw", "nchw"),
                                         ("stem", "channels_last")))
def test_few_values_per_channel_run_in_float64(kind, layout):
    check_few_values_run_in_float64(kind, layout, "cuda_emu")


@pytest.mark.parametrize("kind,k", (("dw", 3), ("dw", 11), ("pw", 1), ("stem", 2)))
@pytest.mark.parametrize("layout", LAYOUTS)
def test_fp32_training_kernels_above_the_exact_count(kind, k, layout):
    """The fp32 training kernels (the tiled depthwise kernel at k = 3, the generic ones at k = 11, the
    conv-act-BN statistics and backward), which the small shapes above no longer reach: 2*17*19 = 646 values
    per channel."""
    from convmixer_kernels import _C
    assert 2 * 17 * 19 > _C.exact_training_max_count()
    cin, patch = (3, 2) if kind == "stem" else (4, 1)
    p = make_block_params(kind, 5, k=k, cin=cin, patch=patch)
    emu(kind, make_x((2, 5 if kind == "dw" else cin, 17 * patch, 19 * patch), torch.float32, layout), p, True,
        "gelu", patch=patch)


# --- cross-layer fusion: the pointwise BN apply folded into the next depthwise block's load ----------
# dw_block(conv_act_bn(x, defer_bn=True)) against the unfused composite of the reference blocks. The CUDA
# kernels take no float64, so the comparison is the DESIGN.md section 4 rule in the kernels' dtype:
# output, the gradients of x and of both blocks' weights, biases, gammas and betas, both running stats.

@pytest.mark.parametrize("C,k,act,dtype", (
    (5, 3, "gelu", torch.float32),        # C = 5, 6 x 7: channel-group, split and tile remainders
    (5, 4, "relu", torch.float32),        # even k: asymmetric same padding
    (8, 5, "gelu_tanh", torch.float32),   # channels_last C = 8: the 16-byte pack path of the apply kernel
    (16, 3, "gelu", torch.bfloat16),      # dx = in_scale*du rounded once to bf16; 16-byte packs of 8
))
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("training", (True, False))
def test_cross_layer_pw_into_dw(C, k, act, dtype, layout, training):
    run_cross_layer(make_x((2, 4, 6, 7), dtype, layout), make_block_params("pw", C, cin=4, dtype=dtype),
                    make_block_params("dw", C, k=k, dtype=dtype), training, act, backend="cuda_emu")


def _dw_op_args(C, in_center, in_scale, in_shift):
    x, w, b = torch.randn(2, C, 6, 7), torch.randn(C, 1, 3, 3), torch.randn(C)
    return x, in_center, in_scale, in_shift, w, b, torch.ones(C), torch.zeros(C)


def test_input_affine_of_the_wrong_size_is_a_clear_error():
    empty = torch.empty(0)
    # 4 scale values for 5 channels
    x, ce, sc, sh, w, b, g, be = _dw_op_args(5, torch.zeros(5), torch.ones(4), torch.zeros(5))
    with pytest.raises(RuntimeError, match="must all be empty or all have 5 elements"):
        op("dw_block_forward")(x, ce, sc, sh, w, b, g, be, empty, empty, True, 1e-5, "gelu", "cuda_emu")
    # all three of the wrong size
    x, ce, sc, sh, w, b, g, be = _dw_op_args(5, torch.zeros(4), torch.ones(4), torch.zeros(4))
    with pytest.raises(RuntimeError, match="in_center must be a contiguous 1-D tensor of 5 elements"):
        op("dw_block_forward")(x, ce, sc, sh, w, b, g, be, empty, empty, True, 1e-5, "gelu", "cuda_emu")
    with pytest.raises(RuntimeError, match="in_center must be a contiguous 1-D tensor of 5 elements"):
        op("dw_block_backward")(torch.randn_like(x), x, ce, sc, sh, w, b, g, g, g, True, empty, "gelu", "cuda_emu")
    # a scale without a shift
    x, ce, sc, sh, w, b, g, be = _dw_op_args(5, torch.zeros(5), torch.ones(5), empty)
    with pytest.raises(RuntimeError, match="in_center, in_scale and in_shift must all be empty or all have 5"):
        op("dw_block_forward")(x, ce, sc, sh, w, b, g, be, empty, empty, True, 1e-5, "gelu", "cuda_emu")


# --- end to end -------------------------------------------------------------------------------------

def test_convmixer_end_to_end_matches_cpu_backend():
    ref = convmixer_kernels.ConvMixer(dim=8, depth=1, kernel_size=3, patch_size=2, num_classes=4, backend="cpu")
    emu_model = convmixer_kernels.ConvMixer(dim=8, depth=1, kernel_size=3, patch_size=2, num_classes=4,
                                            backend="cuda_emu")
    emu_model.load_state_dict(copy.deepcopy(ref.state_dict()))
    x = torch.randn(2, 3, 8, 8)
    outs, grads = [], []
    for model in (ref, emu_model):
        model.train()
        xi = x.clone().requires_grad_(True)
        y = model(xi)
        y.square().mean().backward()
        outs.append(y.detach())
        grads.append([xi.grad] + [p.grad for p in model.parameters()])
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-5)
    for ge, gc in zip(grads[1], grads[0]):
        torch.testing.assert_close(ge, gc, rtol=1e-3, atol=1e-5)
    for be, bc in zip(emu_model.buffers(), ref.buffers()):
        torch.testing.assert_close(be, bc, rtol=1e-4, atol=1e-6)
