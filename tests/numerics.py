"""The numerics rule of DESIGN.md section 4 and a harness that runs a block three ways.

max|fused - ref64| <= 2 * max|torch_same_dtype - ref64| + atol
"""
import copy

import torch

from convmixer_kernels import conv_act_bn, dw_block
from convmixer_kernels.reference import conv_act_bn_reference, dw_block_reference

ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2, torch.float64: 1e-10}


def max_err(a, ref):
    return (a.double() - ref).abs().max().item() if a.numel() else 0.0


def check_rule(name, fused, same, ref64, dtype):
    assert fused.shape == ref64.shape, f"{name}: shape {tuple(fused.shape)} != {tuple(ref64.shape)}"
    ef, et = max_err(fused, ref64), max_err(same, ref64)
    bound = 2 * et + ATOL[dtype]
    assert ef <= bound, f"{name}: fused error {ef:.3e} > 2 * torch error {et:.3e} + {ATOL[dtype]:g}"


def make_block_params(kind, C, k=3, cin=None, patch=1, dtype=torch.float32, affine=True, track=True):
    """Random parameters and buffers (never zeros). Conv params in `dtype`; BN in fp32 (fp64 for fp64)."""
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


GRAD_NAMES = ("weight", "bias", "gamma", "beta")


def _clone_params(p, dtype=None, bn_dtype=None):
    out = {}
    for k, v in p.items():
        if v is None:
            out[k] = None
            continue
        v = v.detach().clone()
        if k in ("weight", "bias") and dtype is not None:
            v = v.to(dtype)
        elif k != "num_batches_tracked" and bn_dtype is not None:
            v = v.to(bn_dtype)
        if k in GRAD_NAMES:
            v.requires_grad_(True)
        out[k] = v
    return out


def run_block(kind, x, p, training, act, momentum=0.1, eps=1e-5, patch=1, steps=1, backend="auto", **kw):
    """Runs `steps` forward+backward steps of fused, same-dtype torch and fp64 reference with identical
    inputs and upstream gradients; checks outputs, all gradients and the running statistics by the rule."""
    dtype = x.dtype
    fmt = torch.channels_last if (x.dim() == 4 and not x.is_contiguous()) else torch.contiguous_format
    runs = {"fused": _clone_params(p), "same": _clone_params(p), "ref": _clone_params(p, torch.float64, torch.float64)}
    for step in range(steps):
        xs = x if step == 0 else torch.randn_like(x.float()).to(dtype).contiguous(memory_format=fmt)
        outs, grads = {}, {}
        dy = None
        for name, q in runs.items():
            xi = xs.detach().clone().to(torch.float64 if name == "ref" else dtype)
            xi = xi.contiguous(memory_format=fmt).requires_grad_(True)
            common = dict(training=training, momentum=momentum, eps=eps, act=act)
            if kind == "dw":
                fn = dw_block if name == "fused" else dw_block_reference
                extra = dict(backend=backend, **kw) if name == "fused" else {}
            else:
                fn = conv_act_bn if name == "fused" else conv_act_bn_reference
                common["patch"] = patch
                extra = dict(backend=backend, **kw) if name == "fused" else {}
            y = fn(xi, q["weight"], q["bias"], q["gamma"], q["beta"], q["running_mean"], q["running_var"],
                   q["num_batches_tracked"], **common, **extra)
            if dy is None:
                # Scaled like the gradient of a mean loss, so reductions over N*H*W stay O(1) and a
                # bf16 output's rounding (relative) does not dwarf the absolute tolerance.
                count = y.shape[0] * y.shape[2] * y.shape[3]
                dy = torch.randn(y.shape, dtype=torch.float64) / count ** 0.5
            y.backward(dy.to(y.dtype).contiguous(memory_format=fmt) if y.dim() == 4 else dy.to(y.dtype))
            outs[name] = y.detach()
            grads[name] = {"x": xi.grad, **{k: q[k].grad for k in GRAD_NAMES if q[k] is not None}}
            if name == "fused":
                assert y.is_contiguous(memory_format=fmt), "fused output changed the memory format"
        cmp_dtype = dtype
        check_rule(f"step {step} y", outs["fused"], outs["same"], outs["ref"], cmp_dtype)
        for g in grads["ref"]:
            check_rule(f"step {step} d{g}", grads["fused"][g], grads["same"][g], grads["ref"][g], cmp_dtype)
        for q in runs.values():
            for k in GRAD_NAMES:
                if q[k] is not None:
                    q[k].grad = None
        if p["running_mean"] is not None:
            for b in ("running_mean", "running_var"):
                check_rule(f"step {step} {b}", runs["fused"][b], runs["same"][b], runs["ref"][b],
                           dtype)
            assert runs["fused"]["num_batches_tracked"].item() == runs["ref"]["num_batches_tracked"].item()
    return runs
