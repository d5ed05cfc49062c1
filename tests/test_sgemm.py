"""The CPU backend's own fp32 GEMM (csrc/cpu/sgemm.cpp) against float64, by the numerics rule: every
edge of its register tile (rows past a multiple of 6, columns past a multiple of its panel), each
epilogue part, W read through a transposed view; and the pointwise block and stem on either GEMM route."""
import contextlib

import pytest
import torch
import torch.nn.functional as F

from convmixer_kernels import _C
from convmixer_kernels.numerics import rule
from numerics import make_block_params, make_x, run_block, run_cross_layer

ACT_CODES = {None: -1, "gelu": 0, "gelu_tanh": 1, "relu": 2}


def _act(t, act):
    if act is None:
        return t
    if act == "relu":
        return torch.relu(t)
    return F.gelu(t, approximate="tanh" if act == "gelu_tanh" else "none")


def _expected(X, W, bias, act, scale, shift):
    y = _act(F.linear(X, W, bias), act)
    if scale is not None:
        y = y * scale
    if shift is not None:
        y = y + shift
    return y


@contextlib.contextmanager
def gemm_route(route):
    before = _C.cpu_gemm()
    _C.set_cpu_gemm(route)
    try:
        yield
    finally:
        _C.set_cpu_gemm(before)


@pytest.mark.parametrize("M", (1, 5, 6, 7, 13, 100))
@pytest.mark.parametrize("N", (1, 7, 16, 17, 40, 300))
@pytest.mark.parametrize("K", (1, 3, 64, 300))
def test_own_gemm_tile_edges(M, N, K):
    X = torch.randn(M, K)
    W = torch.randn(N, K)
    y = _C.cpu_sgemm_nt(X, W)
    check = rule("X W^T", y, X @ W.t(), X.double() @ W.double().t(), torch.float32)
    assert check.ok, check


@pytest.mark.parametrize("act", (None, "relu", "gelu", "gelu_tanh"))
@pytest.mark.parametrize("parts", ("bias", "bias+bn", "bn", "none"))
def test_own_gemm_epilogue(act, parts):
    M, N, K = 29, 37, 45
    X = torch.randn(M, K) * 2 + 0.5
    W = torch.randn(N, K) / K ** 0.5
    bias = torch.randn(N) if "bias" in parts else None
    scale = torch.rand(N) + 0.5 if "bn" in parts else None
    shift = torch.randn(N) if "bn" in parts else None
    y = _C.cpu_sgemm_nt(X, W, bias, ACT_CODES[act], scale, shift)
    d = lambda t: None if t is None else t.double()  # noqa: E731
    check = rule(f"epilogue {parts} {act}", y, _expected(X, W, bias, act, scale, shift),
                 _expected(X.double(), W.double(), d(bias), act, d(scale), d(shift)), torch.float32)
    assert check.ok, check


def test_own_gemm_strided_operands():
    """W as a transposed view (the backward's dZ = dT W reads W^T in place) and X with a row stride."""
    base = torch.randn(50, 40)
    X = base[:, :33]  # row stride 40
    Wt = torch.randn(33, 21).t()  # (21, 33), strides (1, 21)
    y = _C.cpu_sgemm_nt(X, Wt)
    assert y.is_contiguous() and y.shape == (50, 21)
    check = rule("strided", y, X @ Wt.t(), X.double() @ Wt.double().t(), torch.float32)
    assert check.ok, check


def test_own_gemm_nan_propagates_and_empty():
    X = torch.randn(7, 5)
    X[3, 2] = float("nan")
    y = _C.cpu_sgemm_nt(X, torch.randn(18, 5), None, ACT_CODES["relu"])
    assert torch.isnan(y[3]).all() and not torch.isnan(y[[0, 1, 2, 4, 5, 6]]).any()
    assert _C.cpu_sgemm_nt(torch.randn(0, 5), torch.randn(4, 5)).shape == (0, 4)
    assert _C.cpu_sgemm_nt(torch.randn(3, 5), torch.randn(0, 5)).shape == (3, 0)
    y = _C.cpu_sgemm_nt(torch.randn(3, 0), torch.randn(4, 0), torch.arange(4.0), ACT_CODES["relu"])
    assert torch.equal(y, torch.arange(4.0).expand(3, 4))


def test_own_gemm_bad_input():
    with pytest.raises(RuntimeError, match="fp32 CPU tensors"):
        _C.cpu_sgemm_nt(torch.randn(3, 4, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64))
    with pytest.raises(RuntimeError, match=r"X \(M, K\)"):
        _C.cpu_sgemm_nt(torch.randn(3, 4), torch.randn(5, 3))
    with pytest.raises(RuntimeError, match="own.*onednn"):
        _C.set_cpu_gemm("mkl")


@pytest.mark.parametrize("route", ("own", "onednn"))
@pytest.mark.parametrize("training", (True, False))
@pytest.mark.parametrize("act", ("gelu", "relu"))
def test_blocks_on_either_gemm_route(route, training, act):
    """The pointwise block, the stem and the pointwise -> depthwise pair (the BN deferred) in channels_last,
    the layout whose GEMMs take the route, on each route: eval's one GEMM with its epilogue, training's
    forward GEMM and the backward's dZ = dT W. More than 512 values per channel, so training runs the fp32
    kernels, not the float64 path for few values."""
    with gemm_route(route):
        assert _C.cpu_gemm() == route
        x = make_x((4, 20, 12, 12), torch.float32, "channels_last")
        run_block("pw", x, make_block_params("pw", 37, cin=20), training, act, steps=2)
        run_cross_layer(x, make_block_params("pw", 24, cin=20), make_block_params("dw", 24, k=3), training, act,
                        steps=2, backend="cpu")
        x = make_x((3, 3, 112, 112), torch.float32, "channels_last")
        run_block("stem", x, make_block_params("stem", 19, cin=3, patch=7), training, act, patch=7, steps=2)

