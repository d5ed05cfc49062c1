"""The depthwise ops a synchronized BN splits its passes into (sync_bn.py), on every kernel backend:
dw_block_batch_stats (forward statistics only), dw_block_backward_reduce (backward sums only) and
dw_block_backward with the global means dy_means. Each against float64 by the numerics rule, with
opcheck; and the synchronized blocks end to end under fp64 gradcheck in a 1-rank gloo group. (The
multi-rank behaviour is tests/test_distributed.py.)"""
import datetime
import os

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from convmixer_kernels import backends
from convmixer_kernels._library import op
from convmixer_kernels.conv_act_bn import conv_act_bn
from convmixer_kernels.dw_block import dw_block
from convmixer_kernels.reference import act_fn, same_padding
from dist_workers import free_port
from numerics import LAYOUTS, check_rule, make_x

KERNEL_BACKENDS = ("cpu", "triton", "cuda_emu", "cuda")


def _device(backend):
    ok, why = backends.available_backends()[backend]
    if not ok:
        pytest.skip(f"{backend}: {why}")
    return "cuda" if backend == "cuda" or (backend == "triton" and not _interpreting()) else "cpu"


def _interpreting():
    return os.environ.get("TRITON_INTERPRET") == "1"


def _args(C, k, layout, affine, device, dtype=torch.float32, hw=(5, 6)):
    x = make_x((2, C) + hw, dtype, layout).to(device)
    w, b = (torch.randn(C, 1, k, k) / k).to(dtype).to(device), (0.5 * torch.randn(C)).to(dtype).to(device)
    # the centre near the channel means (a BN's batch mean), the scale and shift of order 1
    ce, sc, sh = (x.mean((0, 2, 3)).float() + 0.1 * torch.randn(C, device=device), (torch.rand(C) + 0.5).to(device),
                  torch.randn(C).to(device)) if affine else (torch.empty(0, device=device),) * 3
    return x, ce, sc, sh, w, b


def _g(x, ce, sc, sh, w, b, act):
    """g = act(dwconv(u) + b) by PyTorch, in x's dtype (float64 for the reference)."""
    per_channel = [v.to(x.dtype).view(1, -1, 1, 1) for v in (ce, sc, sh)]
    u = (x - per_channel[0]) * per_channel[1] + per_channel[2] if sc.numel() else x
    pl, pr = same_padding(w.shape[-1])
    return act_fn(F.conv2d(F.pad(u, (pl, pr, pl, pr)), w, b, groups=x.shape[1]), act)


def _cpu64(*ts):
    return [t.detach().cpu().double() for t in ts]


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("affine", (False, True))
@pytest.mark.parametrize("act,k", (("gelu", 3), ("relu", 4)))
def test_batch_stats_and_backward_reduce_match_float64(backend, layout, affine, act, k):
    dev = _device(backend)
    C = 5
    x, ce, sc, sh, w, b = _args(C, k, layout, affine, dev)
    mean, var = op("dw_block_batch_stats")(x, ce, sc, sh, w, b, act, backend)
    g64 = _g(*_cpu64(x, ce, sc, sh, w, b), act)
    g32 = _g(*[t.cpu() for t in (x, ce, sc, sh, w, b)], act)
    for name, f in (("mean", lambda g: g.mean((0, 2, 3))), ("var", lambda g: g.var((0, 2, 3), unbiased=False))):
        check_rule(name, (mean if name == "mean" else var).cpu(), f(g32), f(g64), torch.float32)
    # backward sums at given statistics (a synchronized BN's global ones)
    m, r = torch.randn(C).to(dev) * 0.1, torch.rand(C).to(dev) + 0.5
    dy = torch.randn_like(x)
    sums = op("dw_block_backward_reduce")(dy, x, ce, sc, sh, w, b, m, r, act, backend)
    assert sums.shape == (3, C) and sums.dtype == torch.float32

    def ref(g, dyv, mv, rv):
        gh = (g - mv.view(1, -1, 1, 1)) * rv.view(1, -1, 1, 1)
        return torch.stack([dyv.sum((0, 2, 3)), (dyv * gh).sum((0, 2, 3)), gh.sum((0, 2, 3))])
    check_rule("sums", sums.cpu(), ref(g32, dy.cpu(), m.cpu(), r.cpu()), ref(g64, *_cpu64(dy, m, r)), torch.float32)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("affine", (False, True))
@pytest.mark.parametrize("offset", (0.0, 100.0))
def test_backward_with_dy_means_is_the_training_backward(backend, layout, affine, offset):
    """With dy_means = this batch's own means [mean dy, mean dy*(ghat - dhat), dhat] formed from the reduce
    op's sums as sync_bn.py does, the backward is the ordinary training backward, which recentres ghat on the
    exact mean of g; the local sums are then not formed (dgamma/dbeta empty). offset 100, spread 1e-4: the
    saved fp32 mean is off centre by a sizeable part of std, and both must remove it alike (578 values per
    channel: above the float64 bound, so both calls run the fp32 kernels)."""
    dev = _device(backend)
    C = 6
    x, ce, sc, sh, w, b = _args(C, 3, layout, affine, dev, hw=(17, 17) if offset else (5, 6))
    if offset:
        x = x * 1e-4 + offset
    gamma, beta = torch.randn(C, device=dev), torch.randn(C, device=dev)
    e = torch.empty(0, device=dev)
    _, mean, rstd, _ = op("dw_block_forward")(x, ce, sc, sh, w, b, gamma, beta, e, e, True, 1e-5, "gelu", backend)
    dy = torch.randn_like(x)
    local = op("dw_block_backward")(dy, x, ce, sc, sh, w, b, gamma, mean, rstd, True, e, "gelu", backend)
    sums = op("dw_block_backward_reduce")(dy, x, ce, sc, sh, w, b, mean, rstd, "gelu", backend)
    means = sums / (x.numel() / C)
    means[1] -= means[2] * means[0]  # sum dy*(ghat - dhat)
    torch.testing.assert_close(sums[0], local[4], rtol=1e-6, atol=1e-6)  # dbeta
    torch.testing.assert_close(sums[1] - means[2] * sums[0], local[3], rtol=1e-5, atol=1e-5)  # dgamma
    given = op("dw_block_backward")(dy, x, ce, sc, sh, w, b, gamma, mean, rstd, True, means, "gelu", backend)
    assert given[3].numel() == 0 and given[4].numel() == 0
    for i, name in ((0, "dx"), (1, "dweight"), (2, "dbias"), (5, "din_scale"), (6, "din_shift")):
        torch.testing.assert_close(given[i], local[i], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_opcheck_sync_ops(layout):
    x, ce, sc, sh, w, b = _args(4, 3, layout, True, "cpu")
    m, r = torch.randn(4), torch.rand(4) + 0.5
    torch.library.opcheck(op("dw_block_batch_stats"), (x, ce, sc, sh, w, b, "gelu", "cpu"))
    dy = torch.randn_like(x)
    torch.library.opcheck(op("dw_block_backward_reduce"), (dy, x, ce, sc, sh, w, b, m, r, "gelu", "cpu"))
    torch.library.opcheck(op("dw_block_backward"),
                          (dy, x, ce, sc, sh, w, b, torch.randn(4), m, r, True, torch.randn(3, 4), "gelu", "cpu"))


def test_dy_means_without_batch_statistics_is_an_error():
    x, ce, sc, sh, w, b = _args(4, 3, "nchw", False, "cpu")
    m, r = torch.randn(4), torch.rand(4) + 0.5
    with pytest.raises(RuntimeError, match="dy_means is only meaningful with batch statistics"):
        op("dw_block_backward")(torch.randn_like(x), x, ce, sc, sh, w, b, m, m, r, False, torch.randn(3, 4), "gelu",
                                "cpu")


@pytest.fixture
def one_rank_group():
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=60))
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_gradcheck_synced_blocks_fp64(one_rank_group, layout):
    """The synchronized pointwise -> depthwise pair (deferred BN with global statistics, then the
    synchronized depthwise block) in float64 through the CPU kernels: every input and parameter."""
    C, Cin = 3, 4
    x = make_x((2, Cin, 4, 3), torch.float64, layout).requires_grad_()
    wp = (torch.randn(C, Cin, 1, 1, dtype=torch.float64) / 2).requires_grad_()
    bp = torch.randn(C, dtype=torch.float64).requires_grad_()
    gp, bep = (torch.rand(C, dtype=torch.float64) + 0.5).requires_grad_(), torch.randn(C, dtype=torch.float64).requires_grad_()
    wd = (torch.randn(C, 1, 3, 3, dtype=torch.float64) / 3).requires_grad_()
    bd = torch.randn(C, dtype=torch.float64).requires_grad_()
    gd, bed = (torch.rand(C, dtype=torch.float64) + 0.5).requires_grad_(), torch.randn(C, dtype=torch.float64).requires_grad_()
    wq, bq = torch.randn(C, C, 1, 1, dtype=torch.float64) / 2, torch.randn(C, dtype=torch.float64)

    def f(x, wp, bp, gp, bep, wd, bd, gd, bed):
        z = conv_act_bn(x, wp, bp, gp, bep, training=True, act="gelu", backend="cpu", defer_bn=True, sync_bn=True)
        y = dw_block(z, wd, bd, gd, bed, training=True, act="gelu", backend="cpu", sync_bn=True)
        return conv_act_bn(y, wq, bq, None, None, training=True, act="relu", backend="cpu", sync_bn=True)
    assert torch.autograd.gradcheck(f, (x, wp, bp, gp, bep, wd, bd, gd, bed), eps=1e-6, atol=1e-5)
