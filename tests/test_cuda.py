"""CUDA backend on a real GPU (backend="cuda"): the same checks as tests/test_cuda_emu.py at GPU-sized
block geometry (256 threads, 32 channel lanes, 16x16 / 8x8x8 backward tiles), against the float64
reference. Skipped where the CUDA kernels are not built or no GPU is visible."""
import pytest
import torch

import convmixer_kernels
from convmixer_kernels import backends
from numerics import make_block_params, run_block

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


@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, torch.bfloat16))
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


@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, torch.bfloat16))
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("training", (True, False))
@pytest.mark.parametrize("patch,save_t", ((1, True), (1, False), (7, False)))
def test_conv_act_bn(dtype, layout, training, patch, save_t):
    cin = 3 if patch > 1 else 48
    run_block("pw", make_x((4, cin, 28, 28), dtype, layout), params("pw", 96, cin=cin, patch=patch, dtype=dtype),
              training, "gelu", patch=patch, save_t=save_t, backend="cuda", steps=2)


def test_convmixer_end_to_end_matches_cpu_backend():
    ref = convmixer_kernels.ConvMixer(dim=32, depth=2, kernel_size=9, patch_size=7, num_classes=10, backend="cpu")
    gpu = convmixer_kernels.ConvMixer(dim=32, depth=2, kernel_size=9, patch_size=7, num_classes=10,
                                      backend="cuda").cuda()
    gpu.load_state_dict(ref.state_dict())
    x = torch.randn(4, 3, 56, 56)
    y_ref = ref(x)
    y = gpu(x.cuda())
    torch.testing.assert_close(y.cpu(), y_ref, rtol=1e-3, atol=1e-4)
