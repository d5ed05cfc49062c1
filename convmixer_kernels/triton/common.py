"""Helpers shared by the Triton blocks: activation and its derivative, the Chan/Welford merge, the two
small reduction kernels (statistics finalize, partial sums), and launcher utilities.

The formulas match csrc/common/block_math.h (the C++ backends' single source of truth):
  GELU(t)      = t * Phi(t)                          GELU'(t)      = Phi(t) + t*phi(t)
                 Phi(t) = erfc(-t/sqrt2)/2, erfc by Numerical Recipes' fit (block_math.h normal_cdf: no
                 1 + erf cancellation in the tail)
  tanh-GELU(t) = t/2 * (1 + tanh(u)) = t*s,  u = sqrt(2/pi)*(t + 0.044715 t^3),  s = 1/(1 + exp(-2u))
                 tanh-GELU'(t) = s + 2 t s (1 - s) u'(t)   (no 1 + tanh(u) cancellation for u << 0)
  ReLU(t)      = t <= 0 ? 0 : t (NaN propagates)     ReLU'(t)      = [t > 0] (NaN gives NaN)
  Chan merge of (n_a, mean_a, M2_a) and (n_b, mean_b, M2_b):
      n = n_a + n_b, d = mean_b - mean_a, mean = mean_a + d*n_b/n, M2 = M2_a + M2_b + d^2*n_a*n_b/n
"""
from __future__ import annotations

import os
import sys

import torch
import triton
import triton.language as tl

# Under TRITON_INTERPRET=1 every program runs one by one on the host: one small config per kernel.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

ACT_GELU, ACT_GELU_TANH, ACT_RELU = 0, 1, 2  # _library.ACT_CODES / block_math.h enum Act


# --- device functions -------------------------------------------------------------------------------

@triton.jit
def normal_cdf(t):
    # Phi(t) = erfc(-t/sqrt2)/2, erfc(z) = u*exp(-z^2 + P(u)), u = 1/(1 + z/2) (block_math.h normal_cdf);
    # float64 keeps erf (the fit is fp32-accurate only; the fp64 path is for gradcheck).
    if t.dtype == tl.float64:
        return 0.5 * (1.0 + tl.erf(t * 0.70710678118654752440))
    z = tl.abs(t) * 0.70710678118654752440
    u = 1.0 / (1.0 + 0.5 * z)
    p = 0.17087277 * u - 0.82215223
    p = p * u + 1.48851587
    p = p * u - 1.13520398
    p = p * u + 0.27886807
    p = p * u - 0.18628806
    p = p * u + 0.09678418
    p = p * u + 0.37409196
    p = p * u + 1.00002368
    p = p * u - 1.26551223
    half_erfc = 0.5 * u * tl.exp(p - z * z)
    return tl.where(t < 0.0, half_erfc, 1.0 - half_erfc)


@triton.jit
def act_forward(t, ACT: tl.constexpr):
    # g = act(t); see the module docstring.
    if ACT == 0:
        return t * normal_cdf(t)
    elif ACT == 1:
        u = 0.79788456080286535588 * (t + 0.044715 * t * t * t)
        return t / (1.0 + tl.exp(-2.0 * u))
    else:
        return tl.where(t <= 0.0, 0.0, t)


@triton.jit
def act_backward(t, ACT: tl.constexpr):
    # act'(t): GELU' = Phi(t) + t*phi(t); tanh-GELU' by the chain rule; ReLU' = [t > 0] (NaN kept).
    if ACT == 0:
        cdf = normal_cdf(t)
        pdf = 0.39894228040143267794 * tl.exp(-0.5 * t * t)
        return cdf + t * pdf
    elif ACT == 1:
        u = 0.79788456080286535588 * (t + 0.044715 * t * t * t)
        s = 1.0 / (1.0 + tl.exp(-2.0 * u))
        du = 0.79788456080286535588 * (1.0 + 3.0 * 0.044715 * t * t)
        return s * (1.0 + 2.0 * t * (1.0 - s) * du)
    else:
        return tl.where(t > 0.0, 1.0, tl.where(t != t, t, 0.0))


@triton.jit
def welford_merge(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
    # Chan et al.'s parallel merge; an empty side (n = 0) leaves the other unchanged.
    n = n_a + n_b
    safe_n = tl.where(n == 0.0, 1.0, n)
    delta = mean_b - mean_a
    mean = mean_a + delta * (n_b / safe_n)
    m2 = m2_a + m2_b + delta * delta * (n_a * n_b / safe_n)
    return n, mean, m2


@triton.jit
def tile_moments(g, valid, count):
    # (mean, M2) per column of a tile over its valid rows, by the corrected two-pass algorithm on values
    # held in registers: m0 = sum(g)/n, d = g - m0, mean = m0 + sum(d)/n, M2 = sum(d^2) - sum(d)^2/n
    # (the sum(d) term corrects m0's rounding, which matters when |mean| >> std).
    inv_n = 1.0 / tl.maximum(count, 1.0)
    m0 = tl.sum(tl.where(valid, g, 0.0), axis=0) * inv_n
    d = tl.where(valid, g - m0[None, :], 0.0)
    s1 = tl.sum(d, axis=0)
    return m0 + s1 * inv_n, tl.sum(d * d, axis=0) - s1 * s1 * inv_n


# --- reduction kernels ------------------------------------------------------------------------------

@triton.jit
def _bn_stats_finalize_kernel(count_ptr, pmean_ptr, pm2_ptr, R, C, eps, mean_ptr, var_ptr, rstd_ptr,
                              BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    # count/pmean/pm2 = [R, C] partial (count, mean, M2). Merges the R partials of each channel with Chan's
    # rule (a tree merge inside each BLOCK_R chunk, sequential across chunks), then
    # mean, var = M2/count (biased), rstd = 1/sqrt(var + eps).
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    n_acc = tl.zeros([BLOCK_C], dtype=count_ptr.dtype.element_ty)
    mean_acc = tl.zeros([BLOCK_C], dtype=count_ptr.dtype.element_ty)
    m2_acc = tl.zeros([BLOCK_C], dtype=count_ptr.dtype.element_ty)
    for r0 in range(0, R, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        offs = r.to(tl.int64)[:, None] * C + c[None, :]
        ok = (r < R)[:, None] & c_ok[None, :]
        n_b = tl.load(count_ptr + offs, mask=ok, other=0.0)
        mean_b = tl.load(pmean_ptr + offs, mask=ok, other=0.0)
        m2_b = tl.load(pm2_ptr + offs, mask=ok, other=0.0)
        n_b, mean_b, m2_b = tl.reduce((n_b, mean_b, m2_b), 0, welford_merge)
        n_acc, mean_acc, m2_acc = welford_merge(n_acc, mean_acc, m2_acc, n_b, mean_b, m2_b)
    var = m2_acc / tl.where(n_acc == 0.0, 1.0, n_acc)  # lanes past C have no values
    rstd = 1.0 / tl.sqrt(var + eps)
    tl.store(mean_ptr + c, mean_acc.to(mean_ptr.dtype.element_ty), mask=c_ok)
    tl.store(var_ptr + c, var.to(var_ptr.dtype.element_ty), mask=c_ok)
    tl.store(rstd_ptr + c, rstd.to(rstd_ptr.dtype.element_ty), mask=c_ok)


@triton.jit
def _sum_rows_kernel(part_ptr, R, X, out_ptr, BLOCK_R: tl.constexpr, BLOCK_X: tl.constexpr):
    # out[x] = sum_r part[r, x]  (fixed order: deterministic), cast to out's dtype.
    xo = tl.program_id(0) * BLOCK_X + tl.arange(0, BLOCK_X)
    x_ok = xo < X
    acc = tl.zeros([BLOCK_X], dtype=part_ptr.dtype.element_ty)
    for r0 in range(0, R, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        ok = (r < R)[:, None] & x_ok[None, :]
        v = tl.load(part_ptr + r.to(tl.int64)[:, None] * X + xo[None, :], mask=ok, other=0.0)
        acc += tl.sum(v, axis=0)
    tl.store(out_ptr + xo, acc.to(out_ptr.dtype.element_ty), mask=x_ok)


# --- launcher utilities -----------------------------------------------------------------------------

def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation/statistics dtype: fp64 for fp64 inputs (computed in fp64), fp32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def tl_acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def use_exact_training(dtype: torch.dtype, batch_stats: bool, count: int) -> bool:
    """Whether a call's passes run in float64 and round once at the end: batch statistics over at most
    _C.exact_training_max_count() values per channel. The CPU backend's rule, from the same constant
    (csrc/cpu/cpu_common.h use_exact_training says why: with few values per channel BatchNorm's
    training gradient is ill-conditioned, and fp32 rounding of t, g and act'(t) is most of it)."""
    from .. import _C
    return batch_stats and dtype != torch.float64 and count <= _C.exact_training_max_count()


def f64(*tensors: torch.Tensor) -> list:
    """The tensors in float64 (memory format kept), for the exact path."""
    return [t.to(torch.float64) for t in tensors]


def poisoning() -> bool:
    """Test hook: `convmixer_kernels.triton.POISON_OUTPUTS = True` NaN-fills every output a launcher
    allocates, so an element a kernel forgets to write fails the numerics tests."""
    pkg = sys.modules.get("convmixer_kernels.triton")
    return bool(getattr(pkg, "POISON_OUTPUTS", False))


def new_output(t: torch.Tensor) -> torch.Tensor:
    if poisoning() and t.is_floating_point():
        t.fill_(float("nan"))
    return t


def num_programs_hint(device: torch.device) -> int:
    """Programs that fill the machine once (used to size split reductions)."""
    if device.type == "cuda" and not INTERPRET:
        return torch.cuda.get_device_properties(device).multi_processor_count * 4
    return 2


def finalize_stats(parts: torch.Tensor, eps: float, mean: torch.Tensor, var: torch.Tensor, rstd: torch.Tensor):
    """parts: [3, R, C] (count, mean, M2) partials -> mean, biased var, rstd per channel."""
    _, R, C = parts.shape
    block_c = 32 if INTERPRET else 128
    _bn_stats_finalize_kernel[(triton.cdiv(C, block_c),)](parts[0], parts[1], parts[2], R, C, eps, mean, var, rstd,
                                                         BLOCK_R=16 if INTERPRET else 64, BLOCK_C=block_c)


def sum_rows(parts: torch.Tensor, out: torch.Tensor):
    """out (any shape, contiguous, X elements) = parts.view(R, X).sum(0), by _sum_rows_kernel."""
    R = parts.shape[0]
    X = out.numel()
    assert parts.numel() == R * X and out.is_contiguous()
    block_x = 64 if INTERPRET else 256
    _sum_rows_kernel[(triton.cdiv(X, block_x),)](parts, R, X, out, BLOCK_R=16 if INTERPRET else 32, BLOCK_X=block_x)


def check_per_channel(op: str, name: str, t: torch.Tensor, C: int, acc: torch.dtype, device):
    if t.device != device or t.dim() != 1 or t.shape[0] != C or not t.is_contiguous() or t.dtype != acc:
        raise RuntimeError(f"{op}: {name} must be a contiguous 1-D {acc} tensor of {C} elements on {device}, "
                           f"got {t.dtype} {tuple(t.shape)} on {t.device}")


def check_activation(op: str, x: torch.Tensor):
    if x.dim() != 4:
        raise RuntimeError(f"{op}: input must be 4-D (N, C, H, W), got shape {tuple(x.shape)}")
    if not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)):
        raise RuntimeError(f"{op}: input must be contiguous in NCHW or channels_last")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise RuntimeError(f"{op}: unsupported dtype {x.dtype}")


def is_channels_last(x: torch.Tensor) -> bool:
    """Dense in channels_last but not NCHW (csrc/cpu/cpu_common.h's rule)."""
    return not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def memory_format_of(x: torch.Tensor):
    return torch.channels_last if is_channels_last(x) else torch.contiguous_format
