"""Bad input raises a clear error naming the problem; NaN propagates; backends never fall back silently."""
import math

import pytest
import torch

import convmixer_kernels as ck
from convmixer_kernels import conv_act_bn, dw_block
from numerics import make_block_params


def _dw_args(C=4, k=3, dtype=torch.float32):
    p = make_block_params("dw", C, k=k, dtype=dtype)
    return [p[n] for n in ("weight", "bias", "gamma", "beta", "running_mean", "running_var", "num_batches_tracked")]


def test_mixed_devices():
    x = torch.randn(2, 4, 5, 5)
    w, b, g, be, rm, rv, nbt = _dw_args()
    with pytest.raises(RuntimeError, match="different devices"):
        dw_block(x, w.to("meta"), b, g, be, rm, rv, nbt)


def test_mixed_dtypes():
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    with pytest.raises(TypeError, match="differs from the weight dtype"):
        dw_block(x, *_dw_args())


def test_integer_input():
    with pytest.raises(TypeError, match="unsupported input dtype"):
        dw_block(torch.ones(2, 4, 5, 5, dtype=torch.int32), *_dw_args())


@pytest.mark.parametrize("shape", ((4, 5, 5), (1, 2, 4, 5, 5)))
def test_not_4d(shape):
    with pytest.raises(ValueError, match="4-D"):
        dw_block(torch.randn(shape), *_dw_args())
    p = make_block_params("pw", 4, cin=4)
    with pytest.raises(ValueError, match="4-D"):
        conv_act_bn(torch.randn(shape), p["weight"], p["bias"], p["gamma"], p["beta"])


def test_channel_mismatch():
    with pytest.raises(ValueError, match="for an input with 6 channels"):
        dw_block(torch.randn(2, 6, 5, 5), *_dw_args(C=4))
    p = make_block_params("pw", 8, cin=4)
    with pytest.raises(ValueError, match="for an input with 6 channels"):
        conv_act_bn(torch.randn(2, 6, 5, 5), p["weight"], p["bias"], p["gamma"], p["beta"])
    with pytest.raises(ValueError, match="BatchNorm weight has shape"):
        conv_act_bn(torch.randn(2, 4, 5, 5), p["weight"], p["bias"], torch.ones(3), p["beta"])


def test_single_value_per_channel_in_training():
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        dw_block(torch.randn(1, 4, 1, 1), *_dw_args(), training=True)
    p = make_block_params("stem", 8, cin=3, patch=2)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        conv_act_bn(torch.randn(1, 3, 3, 3), p["weight"], p["bias"], p["gamma"], p["beta"], training=True, patch=2)
    # eval is fine with a single value
    dw_block(torch.randn(1, 4, 1, 1), *_dw_args(), training=False)


def test_bad_activation_and_backend():
    with pytest.raises(ValueError, match="unsupported activation"):
        dw_block(torch.randn(2, 4, 5, 5), *_dw_args(), act="silu")
    with pytest.raises(ValueError, match="unknown backend"):
        dw_block(torch.randn(2, 4, 5, 5), *_dw_args(), backend="fastest")
    with pytest.raises(ValueError, match="unsupported activation"):
        ck.FusedDepthwiseBlock(4, 3, act="tanh")


def test_named_backend_that_cannot_run_raises_instead_of_falling_back():
    avail = ck.available_backends()
    assert avail["cpu"][0] and avail["reference"][0]
    if not avail["cuda"][0]:
        with pytest.raises(RuntimeError, match="backend 'cuda' is not available"):
            dw_block(torch.randn(2, 4, 5, 5), *_dw_args(), backend="cuda")


def test_env_var_overrides_backend(monkeypatch):
    monkeypatch.setenv("CONVMIXER_BACKEND", "definitely-not-a-backend")
    with pytest.raises(ValueError, match="unknown backend"):
        dw_block(torch.randn(2, 4, 5, 5), *_dw_args(), backend="cpu")


def test_kernel_level_checks():
    """The C++ launchers check their own inputs too (for callers that bypass the functional layer)."""
    from convmixer_kernels import _C
    x = torch.randn(2, 4, 5, 5)
    w, b, g, be, *_ = _dw_args()
    e = torch.empty(0)
    with pytest.raises(RuntimeError, match="weight must have shape"):
        _C.dw_block_forward_cpu(x, e, e, e, w[:3], b, g, be, g, g, False, 1e-5, 0)
    with pytest.raises(RuntimeError, match="must be 4-D"):
        _C.dw_block_forward_cpu(x[0], e, e, e, w, b, g, be, g, g, False, 1e-5, 0)
    with pytest.raises(RuntimeError, match="unknown activation code"):
        _C.dw_block_forward_cpu(x, e, e, e, w, b, g, be, g, g, True, 1e-5, 7)
    with pytest.raises(RuntimeError, match="in_center, in_scale and in_shift must all be empty"):
        _C.dw_block_forward_cpu(x, g, g, e, w, b, g, be, g, g, False, 1e-5, 0)
    with pytest.raises(RuntimeError, match="in_center must be a contiguous 1-D tensor of 4"):
        _C.dw_block_forward_cpu(x, g[:3], g[:3], g[:3], w, b, g, be, g, g, False, 1e-5, 0)


@pytest.mark.parametrize("training", (True, False))
@pytest.mark.parametrize("layout", ("nchw", "channels_last"))
@pytest.mark.parametrize("act", ("gelu", "gelu_tanh", "relu"))
def test_nan_propagates(training, layout, act):
    x = torch.randn(2, 4, 6, 6)
    x[1, 2, 3, 3] = float("nan")
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    y = dw_block(x.clone(), *_dw_args(), training=training, act=act)
    assert torch.isnan(y[1, 2, 3, 3]), "the NaN input element was masked"
    p = make_block_params("pw", 4, cin=4)
    z = conv_act_bn(x.clone(), p["weight"], p["bias"], p["gamma"], p["beta"], training=training, act=act)
    assert torch.isnan(z[1, :, 3, 3]).all(), "the NaN input pixel was masked"
    if training:  # batch statistics see the NaN, so every element of the channel is NaN
        assert torch.isnan(y[:, 2]).all()
