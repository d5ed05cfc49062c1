"""The numerics rule of DESIGN.md section 4 and a harness that runs a block three ways (fused, PyTorch
in the same dtype, float64 reference) with identical inputs and upstream gradients.

    max|fused - ref64| <= 2 * max|torch_same_dtype - ref64| + atol

Used by the tests (which assert) and by `python -m convmixer_kernels verify` (which reports).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ._library import PendingBN
from .conv_act_bn import conv_act_bn
from .dw_block import dw_block
from .reference import conv_act_bn_reference, dw_block_reference

ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2, torch.float64: 1e-10}
GRAD_NAMES = ("weight", "bias", "gamma", "beta")


@dataclass
class Check:
    name: str
    fused_err: float
    torch_err: float
    bound: float

    @property
    def ok(self) -> bool:
        return self.fused_err <= self.bound  # NaN compares False: a NaN error fails

    def __str__(self):
        return (f"{self.name}: fused error {self.fused_err:.3e} {'<=' if self.ok else '>'} "
                f"2 * torch error {self.torch_err:.3e} + atol = {self.bound:.3e}")


def max_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return (a.detach().double() - ref.detach().double()).abs().max().item() if a.numel() else 0.0


def rule(name, fused, same, ref64, dtype) -> Check:
    if tuple(fused.shape) != tuple(ref64.shape):
        return Check(f"{name} (shape {tuple(fused.shape)} != {tuple(ref64.shape)})", float("nan"), 0.0, 0.0)
    et = max_err(same, ref64)
    atol = ATOL[dtype]
    if dtype == torch.float64:
        # PyTorch's float64 result *is* the reference (error 0), so the bound is atol alone; relative to
        # the values' scale, since fp64 rounding of values of size 1e3 is already ~1e-13.
        atol *= max(1.0, ref64.detach().abs().max().item() if ref64.numel() else 0.0)
    return Check(name, max_err(fused, ref64), et, 2 * et + atol)


def make_block_params(kind, C, k=3, cin=None, patch=1, dtype=torch.float32, affine=True, track=True):
    """Random parameters and buffers (never zeros). Conv params in `dtype`; BN in fp32 (fp64 for fp64),
    as under AMP. kind: "dw" (depthwise, C channels) or anything else (conv-act-BN, cin -> C)."""
    bn_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    if kind == "dw":
        w = torch.randn(C, 1, k, k) / k
    else:
        w = torch.randn(C, cin, patch, patch) / (cin * patch * patch) ** 0.5
    p = dict(weight=w.to(dtype), bias=(torch.randn(C) * 0.5).to(dtype))
    p["gamma"] = (1 + 0.5 * torch.randn(C)).to(bn_dtype) if affine else None
    p["beta"] = (0.5 * torch.randn(C)).to(bn_dtype) if affine else None
    if track:
        p["running_mean"] = (0.2 * torch.randn(C)).to(bn_dtype)
        p["running_var"] = (0.5 + torch.rand(C)).to(bn_dtype)
        p["num_batches_tracked"] = torch.tensor(3, dtype=torch.long)
    else:
        p["running_mean"] = p["running_var"] = p["num_batches_tracked"] = None
    return p


def _clone_params(p, device, dtype=None, bn_dtype=None):
    out = {}
    for k, v in p.items():
        if v is None:
            out[k] = None
            continue
        v = v.detach().clone().to(device)
        if k in ("weight", "bias") and dtype is not None:
            v = v.to(dtype)
        elif k != "num_batches_tracked" and bn_dtype is not None:
            v = v.to(bn_dtype)
        if k in GRAD_NAMES:
            v.requires_grad_(True)
        out[k] = v
    return out


VIEWS = ("sliced", "permuted")


def _make_input(xs, view, fmt):
    """(leaf, x_in, grad_of) for one run: the tensor that collects the gradient, the input passed to the
    block, and the map from leaf.grad to dL/dx_in. view None: a dense copy in `fmt`; "permuted": a tensor
    stored N,H,C,W seen as N,C,H,W; "sliced": every other column of a twice-as-wide tensor. Both views
    are dense in neither NCHW nor channels_last."""
    xs = xs.detach()
    if view is None:
        leaf = xs.clone().contiguous(memory_format=fmt).requires_grad_(True)
        return leaf, leaf, lambda g: g
    if view == "permuted":
        leaf = xs.permute(0, 2, 1, 3).contiguous().requires_grad_(True)
        return leaf, leaf.permute(0, 2, 1, 3), lambda g: g.permute(0, 2, 1, 3)
    if view == "sliced":
        N, C, H, W = xs.shape
        leaf = xs.new_zeros(N, C, H, 2 * W)
        leaf[..., ::2] = xs
        leaf.requires_grad_(True)
        return leaf, leaf[..., ::2], lambda g: g[..., ::2]
    raise ValueError(f"unknown view {view!r}; expected None or one of {VIEWS}")


def _layout_ok(y, fmt, view) -> bool:
    """The output keeps a dense input's layout; from a non-dense view it is dense (NCHW, or channels_last
    where the view happens to be dense in it, as a size-1 dimension allows)."""
    if view is None:
        return y.is_contiguous(memory_format=fmt)
    return y.is_contiguous() or y.is_contiguous(memory_format=torch.channels_last)


def compare_block(kind, x, p, training, act, momentum=0.1, eps=1e-5, patch=1, steps=1, backend="auto",
                  view=None, **fused_kwargs) -> list:
    """Runs `steps` forward+backward steps three ways and returns a Check for the output, every gradient
    and the running statistics of each step. The fused and same-dtype runs use x's device; the reference
    runs in float64 on the CPU. kind: "dw" or "pw"/"stem" (conv-act-BN with kernel = stride = patch).
    view ("sliced", "permuted"): every run gets x as that non-dense view (the output is then NCHW)."""
    dtype, device = x.dtype, x.device
    fmt = torch.channels_last if not x.is_contiguous() else torch.contiguous_format
    runs = {"fused": _clone_params(p, device), "same": _clone_params(p, device),
            "ref": _clone_params(p, "cpu", torch.float64, torch.float64)}
    checks = []
    for step in range(steps):
        xs = x if step == 0 else torch.randn(x.shape, device=device).to(dtype).contiguous(memory_format=fmt)
        outs, grads, dy = {}, {}, None
        for name, q in runs.items():
            leaf, xi, grad_of = _make_input(xs.cpu().double() if name == "ref" else xs, view, fmt)
            common = dict(training=training, momentum=momentum, eps=eps, act=act)
            if kind != "dw":
                common["patch"] = patch
            if name == "fused":
                fn = dw_block if kind == "dw" else conv_act_bn
                common.update(backend=backend, **fused_kwargs)
            else:
                fn = dw_block_reference if kind == "dw" else conv_act_bn_reference
            y = fn(xi, q["weight"], q["bias"], q["gamma"], q["beta"], q["running_mean"], q["running_var"],
                   q["num_batches_tracked"], **common)
            if dy is None:
                # Scaled like the gradient of a mean loss, so reductions over N*H*W stay O(1) and a
                # bf16 output's (relative) rounding does not dwarf the absolute tolerance.
                count = y.shape[0] * y.shape[2] * y.shape[3]
                dy = torch.randn(y.shape, dtype=torch.float64) / count ** 0.5
            y.backward(dy.to(device=xi.device, dtype=y.dtype).contiguous(memory_format=fmt))
            outs[name] = y.detach().cpu()
            grads[name] = {"x": grad_of(leaf.grad).cpu(),
                           **{k: q[k].grad.cpu() for k in GRAD_NAMES if q[k] is not None}}
            if name == "fused" and not _layout_ok(y, fmt, view):
                checks.append(Check(f"step {step} y memory format", float("nan"), 0.0, 0.0))
        checks.append(rule(f"step {step} y", outs["fused"], outs["same"], outs["ref"], dtype))
        for g in grads["ref"]:
            checks.append(rule(f"step {step} d{g}", grads["fused"][g], grads["same"][g], grads["ref"][g], dtype))
        for q in runs.values():
            for k in GRAD_NAMES:
                if q[k] is not None:
                    q[k].grad = None
        if p["running_mean"] is not None:
            for b in ("running_mean", "running_var"):
                checks.append(rule(f"step {step} {b}", runs["fused"][b].cpu(), runs["same"][b].cpu(),
                                   runs["ref"][b], dtype))
            nf, nr = runs["fused"]["num_batches_tracked"].item(), runs["ref"]["num_batches_tracked"].item()
            checks.append(Check(f"step {step} num_batches_tracked", abs(nf - nr), 0.0, 0.0))
    return checks


def compare_cross_layer(x, p_pw, p_dw, training, act, momentum=0.1, eps=1e-5, steps=1, backend="auto",
                        view=None) -> list:
    """The cross-layer fused pair: a pointwise conv-act-BN whose BN apply is folded into the next
    depthwise block (conv_act_bn(defer_bn=True) -> dw_block), run three ways like compare_block,
    against the unfused pair in the same dtype and in float64. Checks the output, dx, every parameter
    gradient of both blocks and both blocks' running statistics, per step."""
    dtype, device = x.dtype, x.device
    fmt = torch.channels_last if not x.is_contiguous() else torch.contiguous_format
    runs = {"fused": (_clone_params(p_pw, device), _clone_params(p_dw, device)),
            "same": (_clone_params(p_pw, device), _clone_params(p_dw, device)),
            "ref": (_clone_params(p_pw, "cpu", torch.float64, torch.float64),
                    _clone_params(p_dw, "cpu", torch.float64, torch.float64))}
    checks = []
    for step in range(steps):
        xs = x if step == 0 else torch.randn(x.shape, device=device).to(dtype).contiguous(memory_format=fmt)
        outs, grads, dy = {}, {}, None
        for name, (qp, qd) in runs.items():
            leaf, xi, grad_of = _make_input(xs.cpu().double() if name == "ref" else xs, view, fmt)
            common = dict(training=training, momentum=momentum, eps=eps, act=act)
            args_p = [qp[k] for k in ("weight", "bias", "gamma", "beta", "running_mean", "running_var",
                                      "num_batches_tracked")]
            args_d = [qd[k] for k in ("weight", "bias", "gamma", "beta", "running_mean", "running_var",
                                      "num_batches_tracked")]
            if name == "fused":
                z = conv_act_bn(xi, *args_p, **common, backend=backend, defer_bn=True)
                if not isinstance(z, PendingBN):
                    checks.append(Check(f"conv_act_bn(defer_bn=True) returned {type(z).__name__}, not PendingBN",
                                        float("nan"), 0.0, 0.0))
                y = dw_block(z, *args_d, **common, backend=backend)
                if not _layout_ok(y, fmt, view):
                    checks.append(Check(f"step {step} y memory format", float("nan"), 0.0, 0.0))
            else:
                y = dw_block_reference(conv_act_bn_reference(xi, *args_p, **common), *args_d, **common)
            if dy is None:
                count = y.shape[0] * y.shape[2] * y.shape[3]
                dy = torch.randn(y.shape, dtype=torch.float64) / count ** 0.5
            y.backward(dy.to(device=xi.device, dtype=y.dtype).contiguous(memory_format=fmt))
            outs[name] = y.detach().cpu()
            grads[name] = {"x": grad_of(leaf.grad).cpu()}
            for block, q in (("pw", qp), ("dw", qd)):
                grads[name].update({f"{block}.{k}": q[k].grad.cpu() for k in GRAD_NAMES if q[k] is not None})
                for k in GRAD_NAMES:
                    if q[k] is not None:
                        q[k].grad = None
        checks.append(rule(f"step {step} y", outs["fused"], outs["same"], outs["ref"], dtype))
        for g in grads["ref"]:
            checks.append(rule(f"step {step} d{g}", grads["fused"][g], grads["same"][g], grads["ref"][g], dtype))
        for i, block in enumerate(("pw", "dw")):
            if runs["ref"][i]["running_mean"] is None:
                continue
            for b in ("running_mean", "running_var"):
                checks.append(rule(f"step {step} {block}.{b}", runs["fused"][i][b].cpu(), runs["same"][i][b].cpu(),
                                   runs["ref"][i][b], dtype))
            nf = runs["fused"][i]["num_batches_tracked"].item()
            nr = runs["ref"][i]["num_batches_tracked"].item()
            checks.append(Check(f"step {step} {block}.num_batches_tracked", abs(nf - nr), 0.0, 0.0))
    return checks
