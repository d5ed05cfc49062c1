"""Cross-layer fusion (DESIGN.md section 3): the pointwise block's BN apply folded into the next
depthwise block's load. The pair conv_act_bn(defer_bn=True) -> dw_block must equal the unfused pair
by the numerics rule in its output, every gradient of both blocks and both blocks' running
statistics; models built or converted by the package must actually take this path."""
import copy
import dataclasses
import os

import pytest
import torch

import convmixer_kernels as ck
from convmixer_kernels import backends
from convmixer_kernels.conv_act_bn import conv_act_bn
from convmixer_kernels.dw_block import dw_block
from convmixer_kernels.model import set_cross_layer
from convmixer_kernels.numerics import make_block_params
from convmixer_kernels.reference import ConvMixerPaper

from numerics import LAYOUTS, make_x, randomize_bn, run_cross_layer

KERNEL_BACKENDS = ("cpu", "triton", "cuda_emu", "cuda")


def _require(backend):
    """The device the backend's tensors live on (skips when it is not available here)."""
    ok, why = backends.available_backends()[backend]
    if not ok:
        pytest.skip(f"{backend}: {why}")
    if backend == "cuda" or (backend == "triton" and os.environ.get("TRITON_INTERPRET") != "1"):
        return "cuda"
    return "cpu"


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("training", (True, False))
@pytest.mark.parametrize("act,k", (("gelu", 3), ("relu", 4), ("gelu_tanh", 5)))
def test_pair_matches_unfused(backend, layout, training, act, k):
    x = make_x((2, 6, 6, 7), torch.float32, layout).to(_require(backend))
    p_pw, p_dw = make_block_params("pw", 5, cin=6), make_block_params("dw", 5, k=k)
    run_cross_layer(x, p_pw, p_dw, training, act, steps=2, backend=backend)


_DTYPES = {"cpu": (torch.float64, torch.bfloat16, torch.float16),
           "triton": (torch.float64, torch.float16),  # the interpreter has no bf16
           "cuda_emu": (torch.bfloat16, torch.float16),
           "cuda": (torch.bfloat16, torch.float16)}


# C = 70: whole 16-lane channel vectors and a partial one, over two of the CPU eval's 4-group work items.
@pytest.mark.parametrize("backend,dtype", [(b, d) for b in KERNEL_BACKENDS for d in _DTYPES[b]])
@pytest.mark.parametrize("training", (True, False))
@pytest.mark.parametrize("C", (7, 70))
def test_pair_dtypes(backend, dtype, training, C):
    x = make_x((3, 4, 5, 6), dtype, "channels_last").to(_require(backend))
    p_pw, p_dw = make_block_params("pw", C, cin=4, dtype=dtype), make_block_params("dw", C, k=3, dtype=dtype)
    run_cross_layer(x, p_pw, p_dw, training, "gelu", steps=2, backend=backend)


# fp64 gradcheck on the CPU kernels only: through Triton's interpreter it takes minutes (each of the
# ~100 perturbed forward passes runs every program of every kernel in Python); the Triton pair is
# checked by the numerics rule above, including fp64.
@pytest.mark.parametrize("backend", ("cpu",))
@pytest.mark.parametrize("training", (True, False))
def test_pair_gradcheck(backend, training):
    _require(backend)
    C = 3
    x = torch.randn(2, 4, 4, 5, dtype=torch.float64, requires_grad=True)
    pw = [torch.randn(C, 4, 1, 1, dtype=torch.float64), torch.randn(C, dtype=torch.float64),
          1 + 0.3 * torch.randn(C, dtype=torch.float64), torch.randn(C, dtype=torch.float64)]
    dw = [torch.randn(C, 1, 3, 3, dtype=torch.float64), torch.randn(C, dtype=torch.float64),
          1 + 0.3 * torch.randn(C, dtype=torch.float64), torch.randn(C, dtype=torch.float64)]
    params = [t.requires_grad_(True) for t in pw + dw]
    stats = [torch.randn(C, dtype=torch.float64), torch.rand(C, dtype=torch.float64) + 0.5]

    def pair(x, *p):
        z = conv_act_bn(x, *p[:4], stats[0].clone(), stats[1].clone(), None, training, act="gelu",
                        backend=backend, defer_bn=True)
        assert isinstance(z, ck.PendingBN)
        return dw_block(z, *p[4:], stats[0].clone(), stats[1].clone(), None, training, act="gelu", backend=backend)

    assert torch.autograd.gradcheck(pair, (x, *params), eps=1e-6, atol=1e-5)


def test_materialize_equals_apply():
    """PendingBN.materialize() is the BN apply the fused pointwise block would have written."""
    x = torch.randn(2, 6, 5, 5)
    p = make_block_params("pw", 4, cin=6)
    args = [p[k] for k in ("weight", "bias", "gamma", "beta", "running_mean", "running_var", "num_batches_tracked")]
    for training in (True, False):
        a = conv_act_bn(x, *[copy.deepcopy(t) for t in args], training=training, backend="cpu")
        z = conv_act_bn(x, *[copy.deepcopy(t) for t in args], training=training, backend="cpu", defer_bn=True)
        torch.testing.assert_close(z.materialize(), a, rtol=1e-5, atol=1e-5)


class _Spy:
    """Wraps a kernel backend's launchers and counts the cross-layer calls."""

    def __init__(self, monkeypatch, name):
        b = backends.get_backend(name)
        self.deferred = 0       # conv_act_bn_forward with apply_bn = False
        self.applied = 0        # conv_act_bn_forward with apply_bn = True
        self.affine_loads = 0   # dw_block_forward with an input affine
        self.affine_grads = 0   # dw_block_backward with an input affine

        def cab_fwd(*a):
            if a[-1]:
                self.applied += 1
            else:
                self.deferred += 1
            return b.conv_act_bn_forward(*a)

        def dw_fwd(*a):
            self.affine_loads += a[1].numel() > 0
            return b.dw_block_forward(*a)

        def dw_bwd(*a):
            self.affine_grads += a[2].numel() > 0
            return b.dw_block_backward(*a)

        spy = dataclasses.replace(b, dw_block_forward=dw_fwd, dw_block_backward=dw_bwd, conv_act_bn_forward=cab_fwd)
        monkeypatch.setitem(backends._LOADED, name, spy)


def _models(depth):
    import timm
    ours = ck.ConvMixer(8, depth, kernel_size=3, patch_size=2, num_classes=4, backend="cpu")
    paper = ck.convert(randomize_bn(ConvMixerPaper(8, depth, kernel_size=3, patch_size=2, n_classes=4)), "cpu")
    theirs = ck.convert(randomize_bn(timm.models.convmixer.ConvMixer(dim=8, depth=depth, kernel_size=3, patch_size=2,
                                                                     num_classes=4)), "cpu")
    # timm's forward calls stem and blocks separately: its stem cannot hand on its BN apply.
    return [("ConvMixer", ours, depth), ("paper", paper, depth), ("timm", theirs, depth - 1)]


@pytest.mark.parametrize("training", (True, False))
def test_models_take_the_cross_layer_path(monkeypatch, training):
    depth = 3
    for name, model, expected in _models(depth):
        spy = _Spy(monkeypatch, "cpu")
        model.train(training)
        x = torch.randn(2, 3, 8, 8, requires_grad=True)
        model(x).sum().backward()
        assert (spy.deferred, spy.affine_loads, spy.affine_grads) == (expected, expected, expected), name
        assert spy.applied == depth + 1 - expected, name  # the last pointwise block (and timm's stem)
        set_cross_layer(model, False)
        spy = _Spy(monkeypatch, "cpu")
        model(x).sum().backward()
        assert (spy.deferred, spy.affine_loads, spy.applied) == (0, 0, depth + 1), name


@pytest.mark.parametrize("training", (True, False))
def test_models_cross_layer_on_equals_off(training):
    """Same outputs, gradients and running statistics with and without the cross-layer fusion."""
    for name, model, _ in _models(2):
        on = model.train(training)
        off = set_cross_layer(copy.deepcopy(model), False)
        x = torch.randn(2, 3, 8, 8)
        ya, yb = on(x), off(x)
        torch.testing.assert_close(ya, yb, rtol=1e-4, atol=1e-5, msg=name)
        ya.square().sum().backward()
        yb.square().sum().backward()
        for (n, pa), (_, pb) in zip(on.named_parameters(), off.named_parameters()):
            torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-3, atol=1e-5, msg=f"{name} {n}")
        for (n, ba), (_, bb) in zip(on.named_buffers(), off.named_buffers()):
            torch.testing.assert_close(ba, bb, rtol=1e-5, atol=1e-6, msg=f"{name} {n}")


def test_pending_shape_mismatch_is_a_clear_error():
    p = make_block_params("dw", 5, k=3)
    g = torch.randn(2, 5, 4, 4)
    bad = ck.PendingBN(g, torch.zeros(4), torch.ones(4), torch.zeros(4))
    with pytest.raises(ValueError, match="pending BatchNorm's center/scale/shift"):
        dw_block(bad, p["weight"], p["bias"], p["gamma"], p["beta"], backend="cpu")
