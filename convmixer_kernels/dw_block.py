"""Fused depthwise block  y = x + BN(act(DWConv_k(x)))  : op registration, functional, module.

Forward saves only x and the per-channel statistics; the backward recomputes t = DWConv_k(x) + b.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn as nn

from . import backends, reference
from .sync_bn import SyncedDepthwiseBlock, check_global_count, empty_batch_result, resolve_group, sync_options
from ._library import (ACT_CODES, PendingBN, acc_dtype, autocast_inputs, bn_operands, check_act, check_block_input,
                       check_training_count, dense, input_affine_grads, op, qualname, register_backend_dispatch,
                       update_running_stats_)

# --- op registration --------------------------------------------------------------------------------

register_backend_dispatch("dw_block_forward")
register_backend_dispatch("dw_block_backward")
register_backend_dispatch("dw_block_batch_stats")
register_backend_dispatch("dw_block_backward_reduce")


@torch.library.register_fake(qualname("dw_block_forward"))
def _dw_block_forward_fake(x, in_center, in_scale, in_shift, weight, bias, gamma, beta, mean, rstd, batch_stats, eps,
                           act, backend):
    n = x.shape[1] if batch_stats else 0
    return torch.empty_like(x), gamma.new_empty(n), gamma.new_empty(n), gamma.new_empty(n)


@torch.library.register_fake(qualname("dw_block_backward"))
def _dw_block_backward_fake(dy, x, in_center, in_scale, in_shift, weight, bias, gamma, mean, rstd, batch_stats,
                            dy_means, act, backend):
    n = 0 if dy_means.numel() else gamma.shape[0]
    return (torch.empty_like(x), torch.empty_like(weight, memory_format=torch.contiguous_format),
            torch.empty_like(bias), gamma.new_empty(n), gamma.new_empty(n),
            torch.empty_like(in_scale), torch.empty_like(in_shift))


@torch.library.register_fake(qualname("dw_block_batch_stats"))
def _dw_block_batch_stats_fake(x, in_center, in_scale, in_shift, weight, bias, act, backend):
    acc = acc_dtype(x.dtype)
    return x.new_empty(x.shape[1], dtype=acc), x.new_empty(x.shape[1], dtype=acc)


@torch.library.register_fake(qualname("dw_block_backward_reduce"))
def _dw_block_backward_reduce_fake(dy, x, in_center, in_scale, in_shift, weight, bias, mean, rstd, act, backend):
    return mean.new_empty((3, x.shape[1]))


def _setup_context(ctx, inputs, output):
    x, in_center, in_scale, in_shift, weight, bias, gamma, beta, mean, rstd, batch_stats, eps, act, backend = inputs
    y, batch_mean, batch_rstd, batch_var = output
    if batch_stats:
        mean, rstd = batch_mean, batch_rstd
    ctx.save_for_backward(x, in_center, in_scale, in_shift, weight, bias, gamma, mean, rstd)
    ctx.batch_stats, ctx.act, ctx.backend = batch_stats, act, backend
    ctx.mark_non_differentiable(batch_mean, batch_rstd, batch_var)


def _backward(ctx, dy, *_stat_grads):
    x, in_center, in_scale, in_shift, weight, bias, gamma, mean, rstd = ctx.saved_tensors
    dx, dw, db, dgamma, dbeta, dscale, dshift = op("dw_block_backward")(
        dy, x, in_center, in_scale, in_shift, weight, bias, gamma, mean, rstd, ctx.batch_stats, gamma.new_empty(0),
        ctx.act, ctx.backend)
    return (dx, *input_affine_grads(in_scale, dscale, dshift), dw, db, dgamma, dbeta,
            None, None, None, None, None, None)


torch.library.register_autograd(qualname("dw_block_forward"), _backward, setup_context=_setup_context)


# --- functional -------------------------------------------------------------------------------------

def dw_block(x: Union[torch.Tensor, PendingBN], weight: torch.Tensor, bias: Optional[torch.Tensor],
             gamma: Optional[torch.Tensor], beta: Optional[torch.Tensor],
             running_mean: Optional[torch.Tensor] = None, running_var: Optional[torch.Tensor] = None,
             num_batches_tracked: Optional[torch.Tensor] = None, training: bool = True,
             momentum: Optional[float] = 0.1, eps: float = 1e-5, act: str = "gelu",
             backend: str = "auto", sync_bn: bool = False, process_group=None) -> torch.Tensor:
    """x + BatchNorm(act(depthwise_conv(x, weight, bias, padding='same'))), with nn.BatchNorm2d's
    semantics for training/eval, running statistics, momentum=None and affine/track_running_stats off.

    `x` may be a `PendingBN` (the previous pointwise block's output before its BN apply): the block
    then applies z = scale*(g - center) + shift as it loads g, and computes the same result as dw_block(z).

    sync_bn=True (training): the batch statistics are those of the global batch over `process_group`
    (None: the default group), as nn.SyncBatchNorm's; see sync_bn.py for the passes and collectives."""
    check_act(act)
    if isinstance(x, PendingBN):
        x, in_center, in_scale, in_shift = x
    else:
        in_center = in_scale = in_shift = None
    x, weight, bias = autocast_inputs(x, weight, bias)
    check_block_input("dw_block", x, weight, bias, gamma, beta, running_mean, running_var)
    C = x.shape[1]
    if weight.dim() != 4 or weight.shape[0] != C or weight.shape[1] != 1 or weight.shape[2] != weight.shape[3]:
        raise ValueError(f"dw_block: weight must have shape ({C}, 1, k, k) for an input with {C} channels, "
                         f"got {tuple(weight.shape)}")
    for name, t in (("bias", bias), ("BatchNorm weight", gamma), ("BatchNorm bias", beta),
                    ("running_mean", running_mean), ("running_var", running_var)):
        if t is not None and t.shape != (C,):
            raise ValueError(f"dw_block: {name} has shape {tuple(t.shape)}, expected ({C},) to match the input channels")
    count = x.shape[0] * x.shape[2] * x.shape[3]
    sync = sync_bn and training
    name = backends.resolve(backend, x.device, "dw_block")
    if x.shape[0] == 0 and not sync:  # a synchronized BN still joins the collectives (sync_bn.py)
        return empty_batch_result(torch.empty_like(x), training, running_mean, num_batches_tracked,
                                  x, weight, bias, gamma, beta, in_center, in_scale, in_shift)
    if not sync:
        check_training_count("dw_block", count, training)
    if in_scale is not None:
        acc = acc_dtype(x.dtype)
        in_center, in_scale, in_shift = in_center.to(acc), in_scale.to(acc), in_shift.to(acc)
        if any(t.shape != (C,) for t in (in_center, in_scale, in_shift)):
            raise ValueError(f"dw_block: the pending BatchNorm's center/scale/shift have shapes "
                             f"{tuple(in_center.shape)}, {tuple(in_scale.shape)}, {tuple(in_shift.shape)}, "
                             f"expected ({C},)")
    if name == "reference":
        if sync:
            raise NotImplementedError("dw_block: sync_bn with backend='reference'; the unfused reference is "
                                      "the model with nn.SyncBatchNorm layers")
        if in_scale is not None:  # the unfused layers see the BN output itself
            x = PendingBN(x, in_center, in_scale, in_shift).materialize()
        return reference.dw_block_reference(x, weight, bias, gamma, beta, running_mean, running_var,
                                            num_batches_tracked, training, momentum, eps, act)
    if bias is None:
        bias = torch.zeros(C, dtype=x.dtype, device=x.device)
    g, b, mean, rstd, batch_stats = bn_operands(x.dtype, C, x.device, gamma, beta, running_mean, running_var,
                                                training, eps)
    if in_scale is None:
        in_center = in_scale = in_shift = torch.empty(0, dtype=g.dtype, device=x.device)
    if sync:
        group = resolve_group(process_group, "dw_block")
        y, mean, var, n = SyncedDepthwiseBlock.apply(dense(x), in_center, in_scale, in_shift, weight.contiguous(),
                                                     bias, g, b, eps, act, name, group)
        update_running_stats_(running_mean, running_var, num_batches_tracked, momentum, mean, var,
                              check_global_count("dw_block", n))
        return y
    y, batch_mean, _, batch_var = op("dw_block_forward")(dense(x), in_center, in_scale, in_shift, weight.contiguous(),
                                                          bias, g, b, mean, rstd, batch_stats, eps, act, name)
    if training:
        update_running_stats_(running_mean, running_var, num_batches_tracked, momentum, batch_mean, batch_var, count)
    return y


# --- module -----------------------------------------------------------------------------------------

class FusedDepthwiseBlock(nn.Module):
    """Drop-in for ``Residual(nn.Sequential(Conv2d(dim, dim, k, groups=dim, padding="same"), act,
    BatchNorm2d(dim)))``: same submodule names (``fn.0``, ``fn.1``, ``fn.2``), so checkpoints load as is."""

    def __init__(self, dim: int, kernel_size: int = 9, act: str = "gelu", eps: float = 1e-5,
                 momentum: Optional[float] = 0.1, affine: bool = True, track_running_stats: bool = True,
                 bias: bool = True, backend: str = "auto", device=None, dtype=None):
        super().__init__()
        check_act(act)
        kw = dict(device=device, dtype=dtype)
        self.fn = nn.Sequential(
            nn.Conv2d(dim, dim, kernel_size, groups=dim, padding="same", bias=bias, **kw),
            reference.make_act(act),
            nn.BatchNorm2d(dim, eps, momentum, affine, track_running_stats, **kw))
        self.act = act
        self.backend = backend

    @classmethod
    def from_sequential(cls, fn: nn.Sequential, act: str, backend: str = "auto") -> "FusedDepthwiseBlock":
        """Wraps an existing (conv, act, bn) Sequential without copying its parameters."""
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.fn = fn
        self.act = act
        self.backend = backend
        return self

    def forward(self, x: Union[torch.Tensor, PendingBN]) -> torch.Tensor:
        """A BN child that is an nn.SyncBatchNorm syncs over its process group."""
        conv, bn = self.fn[0], self.fn[2]
        return dw_block(x, conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var,
                        bn.num_batches_tracked, bn.training, bn.momentum, bn.eps, self.act, self.backend,
                        **sync_options(bn))

    def extra_repr(self) -> str:
        return f"act={self.act!r}, backend={self.backend!r}"


__all__ = ["dw_block", "FusedDepthwiseBlock", "ACT_CODES"]
