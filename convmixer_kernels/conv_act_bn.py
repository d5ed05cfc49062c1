"""Fused conv -> act -> BatchNorm for the 1x1 pointwise conv and the patch stem (kernel = stride = p):
op registration, functional, module.

Forward saves x, the per-channel statistics and t = conv(x) + b, except when the GEMM's reduction
dimension Cin*p*p is small (the CIFAR stem: 12), where recomputing t costs about as much as reading
it back, so t is not kept.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn as nn

from . import backends, reference
from .sync_bn import (SyncedStats, check_global_count, empty_batch_result, empty_in_graph, resolve_group,
                      sync_options)
from ._library import (PendingBN, autocast_inputs, bn_affine, bn_operands, check_act, check_block_input,
                       check_training_count, dense, is_channels_last, model_layout, op, qualname,
                       register_backend_dispatch, update_running_stats_)

# Below this GEMM reduction size (Cin * p * p) the backward recomputes t instead of saving it.
RECOMPUTE_T_MAX_K = 64

# --- op registration --------------------------------------------------------------------------------

register_backend_dispatch("conv_act_bn_forward")
register_backend_dispatch("conv_act_bn_backward")


def _output_like(x: torch.Tensor, cout: int, patch: int) -> torch.Tensor:
    """Same layout rule as the kernels: channels_last output for a channels_last input, else NCHW."""
    n, _, h, w = x.shape
    fmt = torch.channels_last if is_channels_last(x) else torch.contiguous_format
    return torch.empty((n, cout, h // patch, w // patch), dtype=x.dtype, device=x.device, memory_format=fmt)


@torch.library.register_fake(qualname("conv_act_bn_forward"))
def _conv_act_bn_forward_fake(x, weight, bias, gamma, beta, mean, rstd, batch_stats, eps, act, patch, save_t,
                              apply_bn, backend):
    cout = weight.shape[0]
    n = cout if batch_stats else 0
    t = _output_like(x, cout, patch) if save_t else x.new_empty(0)
    return _output_like(x, cout, patch), t, gamma.new_empty(n), gamma.new_empty(n), gamma.new_empty(n)


@torch.library.register_fake(qualname("conv_act_bn_backward"))
def _conv_act_bn_backward_fake(dy, x, weight, bias, gamma, mean, rstd, t, dmean, drstd, batch_stats, act, patch,
                               apply_bn, need_dx, backend):
    fmt = torch.channels_last if is_channels_last(x) else torch.contiguous_format
    return (torch.empty_like(x, memory_format=fmt) if need_dx else x.new_empty(0), torch.empty_like(weight, memory_format=torch.contiguous_format),
            torch.empty_like(bias), torch.empty_like(gamma), torch.empty_like(gamma))


def _setup_context(ctx, inputs, output):
    x, weight, bias, gamma, beta, mean, rstd, batch_stats, eps, act, patch, save_t, apply_bn, backend = inputs
    y, t, batch_mean, batch_rstd, batch_var = output
    if batch_stats:
        mean, rstd = batch_mean, batch_rstd
    ctx.save_for_backward(x, weight, bias, gamma, mean, rstd, t)
    ctx.batch_stats, ctx.act, ctx.patch, ctx.apply_bn, ctx.backend = batch_stats, act, patch, apply_bn, backend
    ctx.mark_non_differentiable(t, batch_var)
    # Undefined output grads stay None: materialized, t's would be a zero-filled tensor as large as y
    # on every backward (3.5 ms per pointwise layer at ConvMixer-256/8, batch 64, fresh pages).
    ctx.set_materialize_grads(False)
    if apply_bn or not batch_stats:
        ctx.mark_non_differentiable(batch_mean, batch_rstd)
    # else: g's batch mean and rstd feed the next block's input affine, so gradients flow back through them.


def _backward(ctx, dy, _dt, dmean, drstd, _dvar):
    x, weight, bias, gamma, mean, rstd, t = ctx.saved_tensors
    empty = gamma.new_empty(0)
    if dy is None:  # only the statistics were used
        dy = _output_like(x, weight.shape[0], ctx.patch).zero_()
    dx, dw, db, dgamma, dbeta = op("conv_act_bn_backward")(
        dy, x, weight, bias, gamma, mean, rstd, t, empty if dmean is None else dmean.contiguous(),
        empty if drstd is None else drstd.contiguous(), ctx.batch_stats, ctx.act, ctx.patch, ctx.apply_bn,
        ctx.needs_input_grad[0], ctx.backend)
    if not ctx.apply_bn:
        dgamma = dbeta = None
    if not ctx.needs_input_grad[0]:
        dx = None  # not formed (the stem's images)
    return dx, dw, db, dgamma, dbeta, None, None, None, None, None, None, None, None, None


torch.library.register_autograd(qualname("conv_act_bn_forward"), _backward, setup_context=_setup_context)


# --- functional -------------------------------------------------------------------------------------

def conv_act_bn(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                gamma: Optional[torch.Tensor], beta: Optional[torch.Tensor],
                running_mean: Optional[torch.Tensor] = None, running_var: Optional[torch.Tensor] = None,
                num_batches_tracked: Optional[torch.Tensor] = None, training: bool = True,
                momentum: Optional[float] = 0.1, eps: float = 1e-5, act: str = "gelu", patch: int = 1,
                save_t: Optional[bool] = None, backend: str = "auto",
                defer_bn: bool = False, sync_bn: bool = False, process_group=None) -> Union[torch.Tensor, PendingBN]:
    """BatchNorm(act(conv2d(x, weight, bias, stride=patch))) with weight (Cout, Cin, patch, patch):
    the pointwise block (patch=1) or the patch-embedding stem.

    defer_bn=True returns a `PendingBN` (g = act(conv) and the BN's per-channel center/scale/shift) for a
    following `dw_block` to apply on its load, saving the apply pass; the running statistics are
    updated here either way. (The reference backend returns the tensor itself.)

    sync_bn=True (training): global batch statistics over `process_group` (None: the default group), as
    nn.SyncBatchNorm's; the block then runs in its deferred-BN form and the apply is the next depthwise
    block's load, or one elementwise pass without defer_bn (sync_bn.py has the passes and collectives)."""
    check_act(act)
    x, weight, bias = autocast_inputs(x, weight, bias)
    check_block_input("conv_act_bn", x, weight, bias, gamma, beta, running_mean, running_var)
    cin = x.shape[1]
    if weight.dim() != 4 or weight.shape[1] != cin or tuple(weight.shape[2:]) != (patch, patch):
        raise ValueError(f"conv_act_bn: weight must have shape (Cout, {cin}, {patch}, {patch}) for an input with "
                         f"{cin} channels and patch size {patch}, got {tuple(weight.shape)}")
    cout = weight.shape[0]
    for name, t in (("bias", bias), ("BatchNorm weight", gamma), ("BatchNorm bias", beta),
                    ("running_mean", running_mean), ("running_var", running_var)):
        if t is not None and t.shape != (cout,):
            raise ValueError(f"conv_act_bn: {name} has shape {tuple(t.shape)}, expected ({cout},) to match the "
                             f"conv's output channels")
    if x.shape[2] < patch or x.shape[3] < patch:
        raise ValueError(f"conv_act_bn: input spatial size {tuple(x.shape[2:])} is smaller than the patch {patch}")
    count = x.shape[0] * (x.shape[2] // patch) * (x.shape[3] // patch)
    sync = sync_bn and training
    name = backends.resolve(backend, x.device, "conv_act_bn")
    if x.shape[0] == 0 and not sync:  # no statistics to defer: the empty output itself, even with defer_bn
        return empty_batch_result(_output_like(x, cout, patch), training, running_mean, num_batches_tracked,
                                  x, weight, bias, gamma, beta)
    if not sync:
        check_training_count("conv_act_bn", count, training)
    if name == "reference":
        if sync:
            raise NotImplementedError("conv_act_bn: sync_bn with backend='reference'; the unfused reference is "
                                      "the model with nn.SyncBatchNorm layers")
        return reference.conv_act_bn_reference(x, weight, bias, gamma, beta, running_mean, running_var,
                                               num_batches_tracked, training, momentum, eps, act, patch)
    if bias is None:
        bias = torch.zeros(cout, dtype=x.dtype, device=x.device)
    g, b, mean, rstd, batch_stats = bn_operands(x.dtype, cout, x.device, gamma, beta, running_mean, running_var,
                                                training, eps)
    if save_t is None:
        needs_grad = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (x, weight, bias, gamma, beta))
        save_t = needs_grad and cin * patch * patch > RECOMPUTE_T_MAX_K
    if sync:
        group = resolve_group(process_group, "conv_act_bn")
        if count:
            y, _, mean_l, rstd_l, var_l = op("conv_act_bn_forward")(
                dense(x), weight.contiguous(), bias, g, b, mean, rstd, True, eps, act, patch, save_t, False, name)
        else:  # an empty local batch still joins the collectives, the backward's all_reduce included
            y = empty_in_graph(_output_like(x, cout, patch), x, weight, bias)
            mean_l, rstd_l, var_l = (g.new_zeros(cout) for _ in range(3))
            if torch.is_grad_enabled():
                mean_l.requires_grad_()
                rstd_l.requires_grad_()
        mean, rstd, var, n = SyncedStats.apply(mean_l, rstd_l, var_l, count, eps, group)
        update_running_stats_(running_mean, running_var, num_batches_tracked, momentum, mean.detach(), var,
                              check_global_count("conv_act_bn", n))
        pending = PendingBN(y, *bn_affine(g, b, mean, rstd))
        return pending if defer_bn else pending.materialize()
    y, _, batch_mean, batch_rstd, batch_var = op("conv_act_bn_forward")(
        dense(x), weight.contiguous(), bias, g, b, mean, rstd, batch_stats, eps, act, patch, save_t, not defer_bn, name)
    if training:
        update_running_stats_(running_mean, running_var, num_batches_tracked, momentum, batch_mean.detach(),
                              batch_var, count)
    if defer_bn:
        return PendingBN(y, *bn_affine(g, b, batch_mean if batch_stats else mean, batch_rstd if batch_stats else rstd))
    return y


def conv_act_bn_modules(conv: nn.Conv2d, act: str, bn: nn.BatchNorm2d, x: torch.Tensor,
                        backend: str = "auto", defer_bn: bool = False) -> Union[torch.Tensor, PendingBN]:
    """The fused equivalent of ``bn(act(conv(x)))`` for modules the converter has validated (an
    nn.SyncBatchNorm syncs over its process group)."""
    return conv_act_bn(x, conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var,
                       bn.num_batches_tracked, bn.training, bn.momentum, bn.eps, act, conv.stride[0],
                       backend=backend, defer_bn=defer_bn, **sync_options(bn))


# --- module -----------------------------------------------------------------------------------------

class FusedConvActBN(nn.Sequential):
    """Drop-in for ``nn.Sequential(Conv2d(cin, cout, p, stride=p), act, BatchNorm2d(cout))``: the same
    children (``0``, ``1``, ``2``), so checkpoints load as is; forward runs the fused op.

    channels_last_cpu (False on its own, so the output keeps the input's layout; True as the stem of a
    fused model): on the CPU the input is first made channels_last, so every block after it runs in the
    kernels' fast layout."""

    channels_last_cpu = False

    def __init__(self, in_channels: int, out_channels: int, patch_size: int = 1, act: str = "gelu",
                 eps: float = 1e-5, momentum: Optional[float] = 0.1, affine: bool = True,
                 track_running_stats: bool = True, bias: bool = True, backend: str = "auto", device=None, dtype=None):
        check_act(act)
        kw = dict(device=device, dtype=dtype)
        super().__init__(
            nn.Conv2d(in_channels, out_channels, patch_size, stride=patch_size, bias=bias, **kw),
            reference.make_act(act),
            nn.BatchNorm2d(out_channels, eps, momentum, affine, track_running_stats, **kw))
        self.act = act
        self.backend = backend

    @classmethod
    def from_modules(cls, conv: nn.Conv2d, act_module: nn.Module, bn: nn.BatchNorm2d, act: str,
                     backend: str = "auto") -> "FusedConvActBN":
        self = cls.__new__(cls)
        nn.Sequential.__init__(self, conv, act_module, bn)
        self.act = act
        self.backend = backend
        return self

    def forward(self, x: torch.Tensor, defer_bn: bool = False) -> Union[torch.Tensor, PendingBN]:
        """defer_bn=True: returns a PendingBN for a following fused depthwise block (cross-layer fusion)."""
        x = model_layout(x, self.channels_last_cpu)
        return conv_act_bn_modules(self[0], self.act, self[2], x, self.backend, defer_bn=defer_bn)

    def extra_repr(self) -> str:
        return f"act={self.act!r}, backend={self.backend!r}"


__all__ = ["conv_act_bn", "conv_act_bn_modules", "FusedConvActBN"]
