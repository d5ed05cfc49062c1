"""CUDA backend on a real GPU (backend="cuda"): the same checks as tests/test_cuda_emu.py at GPU-sized
block geometry (256 threads, 32 channel lanes, 16x16 / 8x8x8 backward tiles), against the float64
reference. Skipped where the CUDA kernels are not built or no GPU is visible."""
import pytest
import torch

import convmixer_kernels
from convmixer_kernels import backends
from convmixer_kernels._library import op
from numerics import check_few_values_run_in_float64, make_block_params, run_block, run_cross_layer

_available, _reason = backends.available_backends()["cuda"]
if not _available:
    pytest.skip(f"cuda backend unavailable: {_reason}", allow_module_level=True)

ACTS = ("gelu", "gelu_tanh", "relu")
LAYOUTS = ("nchw", "channels_last")


def make_x(shape, dtype, layout):
    x = torch.randn(shape).to(dtype).cuda()
    return x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x


def params(*args, **kw):
    return {k: (v.cuda() if v is not None else None) for k, v in make_block_params(*args, **kw).items()}


@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, torch.bfloat16, torch.float64))
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("training", (True, False))
@pytest.mark.parametrize("act", ACTS)
def test_dw(dtype, layout, training, act):
    run_block("dw", make_x((4, 64, 19, 19), dtype, layout), params("dw", 64, k=9, dtype=dtype), training, act,
              backend="cuda", steps=2)


@pytest.mark.parametrize("k", (1, 3, 4, 5, 7, 9))
@pytest.mark.parametrize("C,HW", ((3, 33), (130, 7), (1536, 8)))
@pytest.mark.parametrize("layout", LAYOUTS)
def test_dw_shapes(k, C, HW, layout):
    run_block("dw", make_x((2, C, HW, HW), torch.float32, layout), params("dw", C, k=k), True, "gelu",
              backend="cuda")


@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, torch.bfloat16, torch.float64))
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("training", (True, False))
@pytest.mark.parametrize("patch,save_t", ((1, True), (1, False), (7, False)))
def test_conv_act_bn(dtype, layout, training, patch, save_t):
    cin = 3 if patch > 1 else 48
    run_block("pw", make_x((4, cin, 28, 28), dtype, layout), params("pw", 96, cin=cin, patch=patch, dtype=dtype),
              training, "gelu", patch=patch, save_t=save_t, backend="cuda", steps=2)


# Cross-layer fusion: dw_block(conv_act_bn(x, defer_bn=True)) against the unfused reference composite
# (output, every gradient of both blocks, both running stats), as in tests/test_cuda_emu.py.
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("training", (True, False))
def test_cross_layer_pw_into_dw(dtype, layout, training):
    run_cross_layer(make_x((4, 48, 19, 19), dtype, layout), params("pw", 64, cin=48, dtype=dtype),
                    params("dw", 64, k=9, dtype=dtype), training, "gelu", backend="cuda")


@pytest.mark.parametrize("k,act", ((3, "relu"), (4, "gelu_tanh")))
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("training", (True, False))
def test_cross_layer_odd_shapes(k, act, layout, training):
    run_cross_layer(make_x((2, 4, 6, 7), torch.float32, layout), params("pw", 5, cin=4), params("dw", 5, k=k),
                    training, act, backend="cuda")


def test_input_affine_of_the_wrong_size_is_a_clear_error():
    C, empty = 5, torch.empty(0, device="cuda")
    x, w, b = torch.randn(2, C, 6, 7).cuda(), torch.randn(C, 1, 3, 3).cuda(), torch.randn(C).cuda()
    g, be = torch.ones(C).cuda(), torch.zeros(C).cuda()
    ce, sc, sh = torch.zeros(C - 1).cuda(), torch.ones(C - 1).cuda(), torch.zeros(C - 1).cuda()
    with pytest.raises(RuntimeError, match="in_center must be a contiguous 1-D tensor of 5 elements"):
        op("dw_block_forward")(x, ce, sc, sh, w, b, g, be, empty, empty, True, 1e-5, "gelu", "cuda")
    with pytest.raises(RuntimeError, match="in_center must be a contiguous 1-D tensor of 5 elements"):
        op("dw_block_backward")(torch.randn_like(x), x, ce, sc, sh, w, b, g, g, g, True, g.new_empty(0), "gelu", "cuda")


def test_convmixer_end_to_end_matches_cpu_backend():
    ref = convmixer_kernels.ConvMixer(dim=32, depth=2, kernel_size=9, patch_size=7, num_classes=10, backend="cpu")
    gpu = convmixer_kernels.ConvMixer(dim=32, depth=2, kernel_size=9, patch_size=7, num_classes=10,
                                      backend="cuda").cuda()
    gpu.load_state_dict(ref.state_dict())
    x = torch.randn(4, 3, 56, 56)
    y_ref = ref(x)
    y = gpu(x.cuda())
    torch.testing.assert_close(y.cpu(), y_ref, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("kind,layout", (("dw", "channels_last"), ("dw", "nchw"), ("pw", "nchw"),
                                         ("stem", "channels_last")))
def test_few_values_per_channel_run_in_float64(kind, layout):
    """fp32 training with at most _C.exact_training_max_count() values per channel runs the fp64 kernels."""
    check_few_values_run_in_float64(kind, layout, "cuda", "cuda")
