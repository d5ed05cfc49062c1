"""Synchronized BatchNorm for the fused blocks: the batch statistics of every BN layer are those of the
global batch across the ranks of a torch.distributed process group (gloo on CPU, NCCL on GPU).

Per BN layer and training step (DESIGN.md section 3 notation, M_r values per channel on rank r):

forward   each rank's statistics pass gives (M_r, mean_r, M2_r = M_r*var_r) per channel, fp32;
          ONE all_gather of [M_r, mean_r, M2_r] (2C+1 floats per rank); Chan's rule merges them in rank
          order 0, 1, ... on every rank (so every rank gets bitwise the same global statistics):
              M = M_a + M_b,  d = mean_b - mean_a,  mean = mean_a + d*M_b/M,  M2 = M2_a + M2_b + d^2*M_a*M_b/M
          then the apply pass runs with the global mean and rstd = 1/sqrt(M2/M + eps), and the running
          statistics take the global unbiased variance M2/(M-1).
backward  ONE all_reduce of 2C floats before dt is formed:
          depthwise block : [sum dy, sum dy*ghat] (its reduction pass), then the dt pass with their global
                            means (the local sums stay the gradients of gamma and beta, which DDP averages);
          conv-act-BN     : its BN apply is a per-channel affine z = scale*(g - center) + shift (applied by the next
                            depthwise block's load, or in one elementwise pass), so autograd brings back
                            dL/d(global mean) and dL/d(global rstd); these are -gamma*rstd*sum dy and
                            gamma*sum dy*ghat/rstd, i.e. [sum dy, sum dy*ghat] per channel up to a factor
                            every rank knows. They are all_reduced (as the gradients of the global mean and
                            variance) and mapped back onto the local statistics by the derivative of the
                            merge, d mean/d mean_r = M_r/M, d var/d mean_r = 2*M_r*(mean_r - mean)/M,
                            d var/d var_r = M_r/M; the pointwise backward then forms dt in its one pass.

Eval mode issues no collective. A rank whose local batch is empty still joins every collective (with
M_r = 0) and returns an empty output. sync_bn without an initialized process group is an error (not a
silent local fallback): call torch.distributed.init_process_group first, or build without sync_bn.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

# The all_gather carries counts as fp32, exact below 2^24 values per channel on one rank.
MAX_LOCAL_COUNT = 2 ** 24


def resolve_group(process_group, where: str):
    """The process group a synchronized BN reduces over (None: the default group); a clear error
    when torch.distributed has no process group to sync over."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            f"{where}: sync_bn needs an initialized torch.distributed process group (call "
            f"torch.distributed.init_process_group first, e.g. under torchrun), or build the model with "
            f"sync_bn=False for single-process training")
    return process_group if process_group is not None else dist.group.WORLD


def gather_merge_stats(count: int, mean: torch.Tensor, var: torch.Tensor, group):
    """All ranks' (count, mean, biased var) -> the global (count, mean, biased var), merged by Chan's
    rule in rank order. One all_gather. Returns (count tensor (1,), mean (C,), var (C,)) in mean's dtype."""
    if count >= MAX_LOCAL_COUNT:
        raise ValueError(f"sync_bn: {count} values per channel on one rank exceeds the fp32 count limit "
                         f"{MAX_LOCAL_COUNT}")
    C = mean.shape[0]
    local = torch.cat([mean.new_full((1,), float(count)), mean, var * count])
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, local.contiguous(), group=group)
    n_a, mean_a, m2_a = parts[0][:1], parts[0][1:C + 1], parts[0][C + 1:]
    for p in parts[1:]:
        n_b, mean_b, m2_b = p[:1], p[1:C + 1], p[C + 1:]
        n = n_a + n_b
        w_b = torch.where(n > 0, n_b / n.clamp_min(1), torch.zeros_like(n))
        d = mean_b - mean_a
        mean_a = mean_a + d * w_b
        m2_a = m2_a + m2_b + d * d * n_a * w_b
        n_a = n
    var_g = m2_a / n_a.clamp_min(1)
    return n_a, mean_a, var_g


def check_global_count(block: str, n_global: torch.Tensor) -> int:
    """Like nn.BatchNorm2d (and nn.SyncBatchNorm): more than one value per channel over the global batch.
    One host read of the gathered count, as nn.SyncBatchNorm does."""
    n = int(n_global.item())
    if n <= 1:
        raise ValueError(f"{block}: expected more than 1 value per channel when training over the synchronized "
                         f"batch (N*H*W summed over ranks = {n}); BatchNorm statistics are undefined")
    return n


def empty_in_graph(empty: torch.Tensor, *inputs) -> torch.Tensor:
    """`empty` (no elements) made a function of `inputs` for autograd, so that on a rank with an empty
    local batch the backward still reaches, and runs the all_reduce of, every earlier BN layer."""
    live = [t.sum() for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    if not live or not torch.is_grad_enabled():
        return empty
    return (empty + sum(live) * 0).as_strided(empty.shape, empty.stride())  # keeps empty's layout


def empty_batch_result(empty: torch.Tensor, training: bool, running_mean, num_batches_tracked, *inputs) -> torch.Tensor:
    """nn.Conv2d + nn.BatchNorm2d on an empty batch (N = 0): an empty output, in the autograd graph of
    `inputs`; in training with running statistics num_batches_tracked still counts the batch, and the
    running statistics are left as they are (PyTorch does both)."""
    if training and running_mean is not None and num_batches_tracked is not None:
        with torch.no_grad():
            num_batches_tracked.add_(1)
    return empty_in_graph(empty, *inputs)


class SyncedStats(torch.autograd.Function):
    """(local mean, local rstd, local var, local count) -> (global mean, global rstd, global var, global count).
    Differentiable in the means and rstds, so the conv-act-BN block's deferred BN (and its own stat-gradient
    backward) works unchanged over the global batch; the backward is the one all_reduce of the layer."""

    @staticmethod
    def forward(ctx, mean_l, rstd_l, var_l, count_l: int, eps: float, group):
        n, mean, var = gather_merge_stats(count_l, mean_l, var_l, group)
        rstd = torch.rsqrt(var + eps)
        ctx.save_for_backward(mean_l, rstd_l, mean, rstd, n)
        ctx.count_l, ctx.group = count_l, group
        ctx.mark_non_differentiable(var, n)
        return mean, rstd, var, n

    @staticmethod
    def backward(ctx, dmean, drstd, _dvar, _dn):
        mean_l, rstd_l, mean, rstd, n = ctx.saved_tensors
        dmean = torch.zeros_like(mean) if dmean is None else dmean
        drstd = torch.zeros_like(rstd) if drstd is None else drstd
        # rstd = (var + eps)^-1/2: dL/dvar = -rstd^3/2 * dL/drstd. Summed over ranks: the global gradients.
        g = torch.cat([dmean, -0.5 * rstd ** 3 * drstd]).contiguous()
        dist.all_reduce(g, group=ctx.group)
        C = mean.shape[0]
        g_mean, g_var = g[:C], g[C:]
        if ctx.count_l == 0:
            return torch.zeros_like(mean_l), torch.zeros_like(rstd_l), None, None, None, None
        w = ctx.count_l / n  # M_r / M
        dmean_l = w * (g_mean + 2 * (mean_l - mean) * g_var)
        dvar_l = w * g_var
        # var_r = rstd_r^-2 - eps: dL/drstd_r = -2 / rstd_r^3 * dL/dvar_r
        return dmean_l, -2 * dvar_l / rstd_l ** 3, None, None, None, None


class SyncedDepthwiseBlock(torch.autograd.Function):
    """y = u + BN(act(dwconv(u) + b)) with global batch statistics (u = in_scale*(x - in_center) + in_shift, or x).
    Forward: statistics pass, all_gather + merge, apply pass. Backward: reduction pass, all_reduce of
    [sum dy, sum dy*ghat], dt/dx pass with their global means. Returns (y, global mean, global var, n)."""

    @staticmethod
    def forward(ctx, x, in_center, in_scale, in_shift, weight, bias, gamma, beta, eps: float, act: str, backend: str,
                group):
        from ._library import op
        count = x.shape[0] * x.shape[2] * x.shape[3]
        C = x.shape[1]
        if count:
            mean_l, var_l = op("dw_block_batch_stats")(x, in_center, in_scale, in_shift, weight, bias, act, backend)
        else:
            mean_l = var_l = gamma.new_zeros(C)
        n, mean, var = gather_merge_stats(count, mean_l, var_l, group)
        rstd = torch.rsqrt(var + eps)
        if count:
            y = op("dw_block_forward")(x, in_center, in_scale, in_shift, weight, bias, gamma, beta, mean, rstd, False,
                                       eps, act, backend)[0]
        else:
            y = torch.empty_like(x)
        ctx.save_for_backward(x, in_center, in_scale, in_shift, weight, bias, gamma, mean, rstd, n)
        ctx.act, ctx.backend, ctx.group, ctx.count = act, backend, group, count
        ctx.mark_non_differentiable(mean, var, n)
        return y, mean, var, n

    @staticmethod
    def backward(ctx, dy, *_stat_grads):
        from ._library import input_affine_grads, op
        x, in_center, in_scale, in_shift, weight, bias, gamma, mean, rstd, n = ctx.saved_tensors
        C = x.shape[1]
        if ctx.count:
            local = op("dw_block_backward_reduce")(dy, x, in_center, in_scale, in_shift, weight, bias, mean, rstd,
                                                   ctx.act, ctx.backend)
        else:
            local = gamma.new_zeros((3, C))
        sums = local.clone()
        dist.all_reduce(sums, group=ctx.group)
        # dhat = mean ghat: the global mean was rounded to fp32, so ghat is off centre by that much (in rstd
        # units); the kernels use ghat - dhat, and dgamma = sum dy*(ghat - dhat) (csrc/cpu/dw_block.cpp).
        means = sums / n
        dhat = means[2]
        means[1] -= dhat * means[0]
        dgamma_local = local[1] - dhat * local[0]
        if not ctx.count:
            z = torch.zeros_like
            affine = (None, None, None) if in_scale.numel() == 0 else (z(in_center), z(in_scale), z(in_shift))
            return (z(x), *affine, z(weight), z(bias), dgamma_local, local[0], None, None, None, None)
        dx, dw, db, _, _, dscale, dshift = op("dw_block_backward")(
            dy, x, in_center, in_scale, in_shift, weight, bias, gamma, mean, rstd, True, means.contiguous(),
            ctx.act, ctx.backend)
        return (dx, *input_affine_grads(in_scale, dscale, dshift), dw, db, dgamma_local, local[0],
                None, None, None, None)


class SyncBatchNorm2d(torch.nn.BatchNorm2d):
    """The BN child of a fused module that computes its training statistics over the global batch of
    `process_group` (None: the default group). An nn.BatchNorm2d with the same parameters, buffers and
    state_dict keys; unlike nn.SyncBatchNorm, DistributedDataParallel accepts it on CPU modules. It only
    holds state: the fused module that owns it does the work, so calling it on its own is an error."""

    process_group = None

    @classmethod
    def adopt(cls, bn: torch.nn.Module, process_group=None) -> "SyncBatchNorm2d":
        """Turns `bn` (an nn.BatchNorm2d or nn.SyncBatchNorm) into a SyncBatchNorm2d in place: the same
        object, parameters and buffers. An nn.SyncBatchNorm keeps its own group unless one is given."""
        own = getattr(bn, "process_group", None)
        bn.__class__ = cls
        bn.process_group = process_group if process_group is not None else own
        return bn

    def forward(self, x):
        raise RuntimeError("SyncBatchNorm2d holds the state of a fused convmixer_kernels module's synchronized BN "
                           "and is run by that module; outside one, use nn.SyncBatchNorm")


def sync_options(bn) -> dict:
    """The sync_bn/process_group arguments of the fused op that runs `bn`: synchronized when it is a
    SyncBatchNorm2d or an nn.SyncBatchNorm (timm's --sync-bn, convert_sync_batchnorm), over its group."""
    if isinstance(bn, (SyncBatchNorm2d, torch.nn.SyncBatchNorm)):
        return dict(sync_bn=True, process_group=bn.process_group)
    return dict(sync_bn=False, process_group=None)


__all__ = ["SyncBatchNorm2d", "SyncedStats", "SyncedDepthwiseBlock", "empty_batch_result", "empty_in_graph", "gather_merge_stats",
           "resolve_group", "sync_options"]
