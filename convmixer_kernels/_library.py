"""The op layer's shared part: every op schema (defined here and nowhere else), the dispatch from an
op call to the chosen backend's launcher, and the helpers that the functional wrappers of each block
share (input checks, autocast, BatchNorm bookkeeping).

Ops are functional (they mutate nothing). Running statistics are updated by `update_running_stats_`,
the single implementation of nn.BatchNorm2d's rule, on per-channel tensors only (no host sync).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from . import backends

NAMESPACE = "convmixer"
ACT_CODES = {"gelu": 0, "gelu_tanh": 1, "relu": 2}  # csrc/common/block_math.h enum Act

SCHEMAS = {
    # y = u + gamma*(act(dwconv(u)+b) - mean)*rstd + beta, where u = in_scale[c]*(x - in_center[c]) +
    # in_shift[c] (the previous pointwise block's BN apply, folded into this block's load; zero padding
    # applies to u) or u = x when the three are empty. The centre is subtracted before the scale, as
    # BatchNorm does: folding it into the shift cancels when |mean| >> std (issue 11). Returns (y,
    # batch_mean, batch_rstd, batch_var); the batch statistics are empty tensors when batch_stats is
    # false (mean/rstd are then inputs).
    "dw_block_forward":
        "(Tensor x, Tensor in_center, Tensor in_scale, Tensor in_shift, Tensor weight, Tensor bias, Tensor gamma, "
        "Tensor beta, Tensor mean, Tensor rstd, bool batch_stats, float eps, str act, str backend) "
        "-> (Tensor, Tensor, Tensor, Tensor)",
    # Returns (dx, dweight, dbias, dgamma, dbeta, din_scale, din_shift). With du = dL/du:
    # dx = in_scale*du, din_scale = sum(du*(x - in_center)) (centred in the kernel, not from two large
    # sums), din_shift = sum(du) per channel (empty without an input affine); din_center = -in_scale*din_shift.
    # dy_means (3, C) or empty: a synchronized BN's global [mean dy, mean dy*(ghat - dhat), dhat = mean ghat],
    # used in dg (with ghat - dhat: centred on the exact global mean of g) instead of this call's own; the
    # reduction pass is then skipped and dgamma, dbeta come back empty.
    # With batch_stats, mean/rstd are the forward's batch statistics; a backend may recentre ghat on the
    # exact mean of g it recomputes (the CPU does: the saved mean is rounded, csrc/cpu/dw_block.cpp).
    "dw_block_backward":
        "(Tensor dy, Tensor x, Tensor in_center, Tensor in_scale, Tensor in_shift, Tensor weight, Tensor bias, "
        "Tensor gamma, Tensor mean, Tensor rstd, bool batch_stats, Tensor dy_means, str act, str backend) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
    # Synchronized BN, forward pass 1: (mean, var) of g = act(dwconv(u)+b) over this call's batch (biased
    # var, accumulation dtype); nothing else is written.
    "dw_block_batch_stats":
        "(Tensor x, Tensor in_center, Tensor in_scale, Tensor in_shift, Tensor weight, Tensor bias, str act, "
        "str backend) -> (Tensor, Tensor)",
    # Synchronized BN, backward pass 1: the (3, C) local sums [sum dy, sum dy*ghat, sum ghat],
    # ghat = (g-mean)*rstd.
    "dw_block_backward_reduce":
        "(Tensor dy, Tensor x, Tensor in_center, Tensor in_scale, Tensor in_shift, Tensor weight, Tensor bias, "
        "Tensor mean, Tensor rstd, str act, str backend) -> Tensor",
    # y = gamma*(act(conv_p(x)+b) - mean)*rstd + beta with kernel = stride = patch (1: pointwise); with
    # apply_bn false y = act(conv_p(x)+b) (the BN apply is left to the next depthwise block's load).
    # Returns (y, t, batch_mean, batch_rstd, batch_var); t = conv_p(x)+b when save_t, else empty.
    "conv_act_bn_forward":
        "(Tensor x, Tensor weight, Tensor bias, Tensor gamma, Tensor beta, Tensor mean, Tensor rstd, "
        "bool batch_stats, float eps, str act, int patch, bool save_t, bool apply_bn, str backend) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor)",
    # Returns (dx, dweight, dbias, dgamma, dbeta); an empty t is recomputed from x. With apply_bn false,
    # dy is dL/dg for g = act(t), and dmean/drstd (empty: zero) are dL/d(batch mean), dL/d(batch rstd):
    # dt = (dy + dmean/M - drstd*rstd^2*ghat/M)*act'(t)  (training),  dy*act'(t) (eval); dgamma = dbeta = 0.
    # need_dx false (the input needs no gradient, e.g. the stem's images): dx is empty, dZ is not formed.
    "conv_act_bn_backward":
        "(Tensor dy, Tensor x, Tensor weight, Tensor bias, Tensor gamma, Tensor mean, Tensor rstd, Tensor t, "
        "Tensor dmean, Tensor drstd, bool batch_stats, str act, int patch, bool apply_bn, bool need_dx, "
        "str backend) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor)",
}

_lib = torch.library.Library(NAMESPACE, "DEF")
for _name, _schema in SCHEMAS.items():
    _lib.define(_name + _schema)


def op(name: str):
    return getattr(torch.ops.convmixer, name).default


def qualname(name: str) -> str:
    return f"{NAMESPACE}::{name}"


def register_backend_dispatch(name: str):
    """Routes op `name` on CPU and CUDA tensors to `backend.<name>` with the activation as its code."""
    arg_names = [a.split()[-1] for a in SCHEMAS[name][1:SCHEMAS[name].index(") ->")].split(", ")]
    act_pos = arg_names.index("act")

    def impl(*args):
        args = list(args)
        if args[0].numel() == 0:  # the kernels' grid and split arithmetic assume a non-empty input
            raise ValueError(f"{qualname(name)}: empty input of shape {tuple(args[0].shape)}; the functional "
                             f"API (dw_block, conv_act_bn) handles an empty batch as nn.BatchNorm2d does")
        backend = backends.get_backend(args[-1])
        args[act_pos] = ACT_CODES[args[act_pos]]
        # Launchers pick their own precisions; autocast must not re-cast their internal GEMMs.
        with torch.autocast(args[0].device.type, enabled=False):
            out = getattr(backend, name)(*args[:-1])
        return tuple(out) if isinstance(out, (list, tuple)) else out

    for key in ("CPU", "CUDA"):
        torch.library.impl(qualname(name), key, lib=_lib)(impl)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation and statistics dtype: fp64 for fp64 inputs, fp32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def is_channels_last(x: torch.Tensor) -> bool:
    """Dense in channels_last but not NCHW (same rule as csrc/cpu/cpu_common.h)."""
    return not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def model_layout(x: torch.Tensor, channels_last_cpu: bool) -> torch.Tensor:
    """The layout a fused model runs in: channels_last on the CPU when asked (the kernels' fast layout;
    a model's stem input is small, 3 channels, so the copy is cheap), else x as given."""
    if channels_last_cpu and x.device.type == "cpu" and x.dim() == 4 and not is_channels_last(x):
        return x.contiguous(memory_format=torch.channels_last)
    return x


def dense(x: torch.Tensor) -> torch.Tensor:
    """x itself when dense in NCHW or channels_last, else an NCHW copy."""
    if x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last):
        return x
    return x.contiguous()


def check_act(act: str):
    if act not in ACT_CODES:
        raise ValueError(f"convmixer_kernels: unsupported activation {act!r}; expected one of {tuple(ACT_CODES)}")


def check_block_input(block: str, x: torch.Tensor, weight: torch.Tensor, *others: Optional[torch.Tensor]):
    """Clear errors for the mistakes a user makes: wrong rank, devices or dtypes that differ."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{block}: input must be a 4-D (N, C, H, W) tensor, got shape {shape}")
    if not x.is_floating_point() or x.dtype not in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        raise TypeError(f"{block}: unsupported input dtype {x.dtype} (float32, bfloat16, float16, float64)")
    for t in (weight,) + others:
        if t is not None and t.device != x.device:
            raise RuntimeError(f"{block}: tensors are on different devices: input on {x.device}, "
                               f"a parameter or buffer on {t.device}")
    if weight.dtype != x.dtype:
        raise TypeError(f"{block}: input dtype {x.dtype} differs from the weight dtype {weight.dtype} "
                        f"(cast the module, or run under torch.autocast)")


def autocast_inputs(x, weight, bias):
    """Under torch.autocast the conv runs in the autocast dtype, as the unfused layers would: every
    floating input but float64 is cast (autocast's own rule for its lower-precision ops); the BN
    parameters and statistics stay fp32. Runs before the dtype checks, so a block that receives the
    previous block's autocast-dtype output next to fp32 weights is not an error."""
    if not isinstance(x, torch.Tensor) or x.device.type not in ("cpu", "cuda"):
        return x, weight, bias
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        dt = torch.get_autocast_dtype(dev)

        def cast(t):
            if t is None or not t.is_floating_point() or t.dtype in (torch.float64, dt):
                return t
            return t.to(dt)
        x, weight, bias = cast(x), cast(weight), cast(bias)
    return x, weight, bias


def bn_operands(x_dtype, C, device, gamma, beta, running_mean, running_var, training, eps):
    """(gamma, beta, mean, rstd, batch_stats) in the accumulation dtype. BN uses batch statistics in
    training or when it keeps no running statistics; otherwise mean/rstd come from the running ones."""
    acc = acc_dtype(x_dtype)
    g = gamma.to(acc) if gamma is not None else torch.ones(C, dtype=acc, device=device)
    b = beta.to(acc) if beta is not None else torch.zeros(C, dtype=acc, device=device)
    batch_stats = training or running_mean is None
    if batch_stats:
        empty = torch.empty(0, dtype=acc, device=device)
        return g, b, empty, empty, True
    return g, b, running_mean.to(acc), torch.rsqrt(running_var.to(acc) + eps), False


def check_training_count(block: str, count: int, training: bool):
    if training and count <= 1:
        raise ValueError(f"{block}: expected more than 1 value per channel when training (N*H*W = {count}); "
                         f"BatchNorm statistics are undefined")


@torch.no_grad()
def update_running_stats_(running_mean, running_var, num_batches_tracked, momentum, batch_mean, batch_var, count):
    """nn.BatchNorm2d's update: m = momentum, or 1/num_batches_tracked when momentum is None;
    running_mean = (1-m)*running_mean + m*mean;  running_var = (1-m)*running_var + m*var*M/(M-1)."""
    if running_mean is None:
        return
    if num_batches_tracked is not None:
        num_batches_tracked.add_(1)
    if momentum is None:
        # 1/n in double, as nn.BatchNorm2d's Python float (1.0 / long would be fp32, off by ~3e-9 in fp64)
        m = (1.0 / num_batches_tracked.double()).to(running_mean.dtype)
    else:
        m = momentum
    unbiased = batch_var * (count / (count - 1))
    running_mean.mul_(1 - m).add_(batch_mean.to(running_mean.dtype) * m)
    running_var.mul_(1 - m).add_(unbiased.to(running_var.dtype) * m)


class PendingBN(NamedTuple):
    """A BatchNorm output not yet written: z = scale[c]*(g - center[c]) + shift[c], with center = mean,
    scale = gamma*rstd and shift = beta per channel (accumulation dtype). A pointwise block returns one
    when the next depthwise block applies the affine on its load (cross-layer fusion, DESIGN.md section
    3); center, scale and shift carry the autograd graph back to gamma, beta and the batch statistics.
    The centre stays separate, as in BatchNorm itself: scale*g + (beta - mean*scale) cancels when
    |mean| >> std, in the output and in the gradient of scale (issue 11)."""
    g: torch.Tensor
    center: torch.Tensor
    scale: torch.Tensor
    shift: torch.Tensor

    def materialize(self) -> torch.Tensor:
        """z itself, for a consumer that cannot take the pending form (one elementwise pass)."""
        acc = acc_dtype(self.g.dtype)
        shape = (1, -1, 1, 1)
        return ((self.g.to(acc) - self.center.view(shape)) * self.scale.view(shape)
                + self.shift.view(shape)).to(self.g.dtype)


def input_affine_grads(in_scale, din_scale, din_shift):
    """Gradients of (in_center, in_scale, in_shift) from a depthwise backward's (din_scale, din_shift):
    u = in_scale*(x - in_center) + in_shift gives din_center = -in_scale*din_shift. None without an affine."""
    if in_scale.numel() == 0:
        return None, None, None
    return -in_scale * din_shift, din_scale, din_shift


def bn_affine(gamma, beta, mean, rstd):
    """(center, scale, shift) of a BatchNorm apply z = scale*(g - center) + shift: (mean, gamma*rstd, beta)."""
    return mean, gamma * rstd, beta
