"""Fused conv -> act -> BatchNorm in Triton, for the 1x1 pointwise conv and the patch stem
(kernel = stride = p): a GEMM with a per-channel epilogue.

  Z  = the input as an (M x Kd) patch matrix, M = N*Ho*Wo, Kd = Cin*p*p, Ho = H//p, Wo = W//p (floored):
       Z[(n,ho,wo), (ci,pi,pj)] = x[n, ci, ho*p+pi, wo*p+pj]   (gathered on the fly: implicit GEMM)
  T  = Z @ W^T,  t = T + b (rounded to the input dtype, as PyTorch's conv output is),  g = act(t)
  y  = gamma*(g - mean)*rstd + beta,  or y = g when apply_bn is false (the next depthwise block
       applies the BN on its load: cross-layer fusion)

Rows of a GEMM tile are BLOCK_M consecutive output pixels of one image, so every tensor is addressed
through its strides (NCHW and channels_last share the kernels). Output layout: channels_last when the
input is channels_last (not contiguous but channels_last-contiguous), else NCHW (as the CPU launcher).

Passes:
  eval forward     : _cab_gemm_kernel MODE_APPLY: GEMM + bias + act + affine -> y (and t when saved).
  training forward : _cab_gemm_kernel MODE_STATS: GEMM + bias + act -> t and per-row-tile Chan/Welford
                     partials; common._bn_stats_finalize_kernel merges them; _cab_apply_kernel
                     y = A*act(t) + B. With apply_bn false the GEMM epilogue also writes y = g and the
                     apply pass is skipped (one pass instead of two).
  backward         : t saved, or recomputed by _cab_gemm_kernel MODE_T; [training]
                     _cab_backward_reduce (sum dy, sum dy*ghat partials); _cab_backward_dt_kernel
                     (dT = gamma*rstd*(dy - c1 - ghat*c2)*act'(t) as an (M x Cout) matrix in the input
                     dtype, db partials, and in eval the dy sums; with apply_bn false dy is dL/dg and
                     the coefficients come from the gradients of the batch mean/rstd instead, so the
                     reduction pass is skipped); _cab_dweight_kernel dW = dT^T Z
                     (split over M, partials summed by common._sum_rows_kernel); _cab_dinput_kernel
                     dZ = dT W scattered into dx. All GEMMs are tl.dot (fp32 with input_precision="ieee");
                     fp64 inputs use an fp64 broadcast-multiply-sum instead of tl.dot.
The only torch ops on the data path: the stem's dx rows/columns that no patch covers (H % p, W % p)
are zero-filled with Tensor.zero_().
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import (INTERPRET, act_backward, act_forward, acc_dtype, check_activation, check_per_channel, f64,
                     finalize_stats, is_channels_last, memory_format_of, new_output, num_programs_hint, sum_rows, tile_moments,
                     tl_acc, use_exact_training)

MODE_APPLY, MODE_STATS, MODE_T = 0, 1, 2
_TL_DTYPES = {torch.float64: tl.float64, torch.float32: tl.float32, torch.bfloat16: tl.bfloat16,
              torch.float16: tl.float16}

if INTERPRET:
    _GEMM_CONFIGS = [triton.Config({"BLOCK_N": 16, "BLOCK_K": 16}, num_warps=1)]
    _EW_CONFIGS = [triton.Config({"BLOCK_M": 32, "BLOCK_N": 16}, num_warps=1)]
    _DW_CONFIGS = [triton.Config({"BLOCK_M": 32, "BLOCK_N": 16, "BLOCK_K": 16}, num_warps=1)]
    _DZ_CONFIGS = [triton.Config({"BLOCK_M": 32, "BLOCK_N": 16, "BLOCK_K": 16}, num_warps=1)]
    GEMM_BLOCK_M = 32
else:  # Hopper/Ampere tensor-core tiles
    # BLOCK_M = GEMM_BLOCK_M = 128 rows (fixed). Kept: the configs that compile with no stack/local memory
    # (tests/test_triton_aot.py, swept over the modes, P = 1/7, sm_90/sm_80). Dropped: 128x256x32 w8
    # (255 registers + 184-1,016 B of stack in 16 bit), 128x128x32 and 128x128x64 w8 (96 B in the apply
    # epilogue, 16 B in the stem's statistics epilogue): the 128-row fp32 accumulator plus the epilogue
    # tensors do not fit. 16-bit operands (tensor cores):
    _GEMM_CONFIGS_16 = [(64, 32, 4, 4),   # 128x64 tile, BLOCK_K 32, 4 stages: the deep-pipeline default
                        (64, 64, 4, 3)]   # 128x64 tile, BLOCK_K 64: half the K iterations for Cin >= 256
    # fp32 operands (input_precision="ieee": FMA, operands in registers; every 16-bit config spills
    # 88-1,176 B here) and fp64 (multiply-sum): narrow tiles only.
    _GEMM_CONFIGS_32 = [(32, 32, 4, 3),   # 128x32 tile: 32 accumulator registers per thread
                        (32, 16, 4, 3)]   # 128x32, BLOCK_K 16: the smallest operand footprint (stem P=7)
    _GEMM_CONFIGS = [triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
                     for n, k, w, s in _GEMM_CONFIGS_16 + _GEMM_CONFIGS_32]
    _EW_CONFIGS = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w)
                   for m, n, w in ((32, 64, 4), (64, 64, 8), (16, 128, 4), (128, 32, 8))]
    _DW_CONFIGS = [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
                   for m, n, k, w, s in ((64, 64, 64, 4, 3), (64, 128, 64, 8, 3), (32, 128, 128, 8, 3),
                                         (64, 64, 128, 4, 4))]
    _DZ_CONFIGS = [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
                   for m, n, k, w, s in ((128, 32, 64, 4, 4), (128, 64, 128, 8, 3), (64, 64, 64, 4, 4),
                                         (128, 64, 64, 4, 3))]
    GEMM_BLOCK_M = 128  # fixed (not tuned): the training statistics partials are per BLOCK_M row tile
_KEY = ["N", "Cin", "Ho", "Wo", "Cout", "P"]


def _prune_gemm_configs(configs, nargs, **kwargs):
    """prune_configs_by of _cab_gemm_kernel: the 16-bit config list for fp16/bf16 inputs, the fp32 list for
    fp32/fp64 (see _GEMM_CONFIGS_16/_32); then drop BLOCK_N beyond next_pow2(Cout) unless nothing is left."""
    if INTERPRET or len(configs) <= 1:
        return configs
    wide = nargs["x_ptr"].dtype in (torch.float32, torch.float64)
    pool = set(_GEMM_CONFIGS_32 if wide else _GEMM_CONFIGS_16)
    mine = [c for c in configs
            if (c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps, c.num_stages) in pool] or configs
    cout = nargs.get("Cout", kwargs.get("Cout"))
    fit = [c for c in mine if cout is None or c.kwargs["BLOCK_N"] <= max(16, triton.next_power_of_2(cout))]
    return fit or mine


_GEMM_PRUNE = {"early_config_prune": _prune_gemm_configs}


# --- device helpers ---------------------------------------------------------------------------------

@triton.jit
def _row_tile(tile, L, BLOCK_M: tl.constexpr):
    # tile -> (image n as int64, output pixel offsets l within the image, row mask)
    tiles_per_img = tl.cdiv(L, BLOCK_M)
    l = (tile % tiles_per_img) * BLOCK_M + tl.arange(0, BLOCK_M)
    return (tile // tiles_per_img).to(tl.int64), l, l < L


@triton.jit
def _patch_offsets(kk, l, Wo, sxc, sxh, sxw, P: tl.constexpr):
    # offset of Z[(ho,wo), (ci,pi,pj)] = x[., ci, ho*P+pi, wo*P+pj] within one image: [len(l), len(kk)]
    ci = kk // (P * P)
    pi = (kk % (P * P)) // P
    pj = kk % P
    ho = l // Wo
    wo = l % Wo
    return ((ho * P * sxh + wo * P * sxw)[:, None] + (ci * sxc + pi * sxh + pj * sxw)[None, :])


@triton.jit
def _mma(a, b, acc, USE_DOT: tl.constexpr, ACC: tl.constexpr):
    # acc += a @ b: tl.dot (fp32 operands in IEEE precision, like the GPU), or fp64 multiply-sum
    if USE_DOT:
        if a.dtype == tl.float32:
            return tl.dot(a, b, acc, input_precision="ieee")
        else:
            return tl.dot(a, b, acc)
    else:
        return acc + tl.sum(a.to(ACC)[:, :, None] * b.to(ACC)[None, :, :], axis=1)


# --- forward ----------------------------------------------------------------------------------------

@triton.autotune(configs=_GEMM_CONFIGS, key=_KEY + ["MODE"], prune_configs_by=_GEMM_PRUNE)
@triton.jit
def _cab_gemm_kernel(x_ptr, w_ptr, b_ptr, gamma_ptr, beta_ptr, mean_ptr, rstd_ptr, y_ptr, t_ptr, part_ptr,
                     N, Cin, H, W, Ho, Wo, Cout, Kd, sxn, sxc, sxh, sxw, son, soc, soh, sow,
                     P: tl.constexpr, MODE: tl.constexpr, STORE_T: tl.constexpr, APPLY_BN: tl.constexpr,
                     ACT: tl.constexpr, ACC: tl.constexpr, USE_DOT: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # t = Z @ W^T + b over a BLOCK_M (pixels of one image) x BLOCK_N (output channels) tile, then
    #   MODE_APPLY: y = A*act(t) + B (A = gamma*rstd, B = beta - mean*A; A = 1, B = 0 without APPLY_BN),
    #               t stored when STORE_T
    #   MODE_STATS: t stored; part[:, tile, co] = (count, mean, M2) of act(t) over the tile's rows;
    #               without APPLY_BN also y = act(t) (no apply pass follows)
    #   MODE_T    : t stored
    L = Ho * Wo
    pid_m = tl.program_id(0)
    n, l, m_ok = _row_tile(pid_m, L, BLOCK_M)
    co = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    co_ok = co < Cout
    x_img = x_ptr + n * sxn
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32 if USE_DOT else ACC)
    for k0 in range(0, Kd, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        k_ok = kk < Kd
        z = tl.load(x_img + _patch_offsets(kk, l, Wo, sxc, sxh, sxw, P), mask=m_ok[:, None] & k_ok[None, :],
                    other=0.0)
        wt = tl.load(w_ptr + co[None, :] * Kd + kk[:, None], mask=k_ok[:, None] & co_ok[None, :], other=0.0)
        acc = _mma(z, wt, acc, USE_DOT, ACC)
    t = acc.to(ACC) + tl.load(b_ptr + co, mask=co_ok, other=0.0).to(ACC)[None, :]
    t = t.to(x_ptr.dtype.element_ty).to(ACC)  # the conv output in the input dtype, as PyTorch's
    ok = m_ok[:, None] & co_ok[None, :]
    out_offs = n * son + co[None, :] * soc + ((l // Wo) * soh + (l % Wo) * sow)[:, None]
    if STORE_T:
        tl.store(t_ptr + out_offs, t.to(t_ptr.dtype.element_ty), mask=ok)
    if MODE == 0:
        if APPLY_BN:
            scale = (tl.load(gamma_ptr + co, mask=co_ok, other=0.0).to(ACC)
                     * tl.load(rstd_ptr + co, mask=co_ok, other=0.0).to(ACC))
            shift = tl.load(beta_ptr + co, mask=co_ok, other=0.0).to(ACC) - \
                tl.load(mean_ptr + co, mask=co_ok, other=0.0).to(ACC) * scale
            y = act_forward(t, ACT) * scale[None, :] + shift[None, :]
        else:
            y = act_forward(t, ACT)
        tl.store(y_ptr + out_offs, y.to(y_ptr.dtype.element_ty), mask=ok)
    if MODE == 1:
        count = tl.sum(m_ok.to(ACC), axis=0)
        g = act_forward(t, ACT)
        if not APPLY_BN:  # the moments of the stored g, which the next block normalizes (csrc/cpu/conv_act_bn.cpp)
            g = g.to(y_ptr.dtype.element_ty).to(ACC)
        mean_b, m2_b = tile_moments(g, m_ok[:, None], count)
        plane = tl.num_programs(0).to(tl.int64) * Cout
        offs = pid_m.to(tl.int64) * Cout + co
        tl.store(part_ptr + offs, tl.zeros([BLOCK_N], dtype=ACC) + count, mask=co_ok)
        tl.store(part_ptr + plane + offs, mean_b, mask=co_ok)
        tl.store(part_ptr + 2 * plane + offs, m2_b, mask=co_ok)
        if not APPLY_BN:
            tl.store(y_ptr + out_offs, g.to(y_ptr.dtype.element_ty), mask=ok)


@triton.autotune(configs=_EW_CONFIGS, key=_KEY)
@triton.jit
def _cab_apply_kernel(t_ptr, gamma_ptr, beta_ptr, mean_ptr, rstd_ptr, y_ptr, N, Cin, Ho, Wo, Cout, P,
                      son, soc, soh, sow, ACT: tl.constexpr, ACC: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # y = A*act(t) + B,  A = gamma*rstd, B = beta - mean*A   (training's apply pass; y and t share strides)
    n, l, m_ok = _row_tile(tl.program_id(0), Ho * Wo, BLOCK_M)
    co = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    co_ok = co < Cout
    ok = m_ok[:, None] & co_ok[None, :]
    offs = n * son + co[None, :] * soc + ((l // Wo) * soh + (l % Wo) * sow)[:, None]
    t = tl.load(t_ptr + offs, mask=ok, other=0.0).to(ACC)
    scale = tl.load(gamma_ptr + co, mask=co_ok, other=0.0).to(ACC) * tl.load(rstd_ptr + co, mask=co_ok, other=0.0).to(ACC)
    shift = tl.load(beta_ptr + co, mask=co_ok, other=0.0).to(ACC) - tl.load(mean_ptr + co, mask=co_ok, other=0.0).to(ACC) * scale
    y = act_forward(t, ACT) * scale[None, :] + shift[None, :]
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=ok)


# --- backward ---------------------------------------------------------------------------------------

@triton.autotune(configs=_EW_CONFIGS, key=_KEY + ["FORM_DT"])
@triton.jit
def _cab_backward_dt_kernel(dy_ptr, t_ptr, gamma_ptr, mean_ptr, rstd_ptr, dbeta_ptr, dgamma_ptr, dhat_ptr, dmean_ptr,
                            drstd_ptr, dT_ptr, part_ptr, N, Cin, Ho, Wo, Cout, P, sdn, sdc, sdh, sdw, stn, stc, sth,
                            stw,
                            FORM_DT: tl.constexpr, TRAINING: tl.constexpr, APPLY_BN: tl.constexpr,
                            ACT: tl.constexpr, ACC: tl.constexpr, G_DTYPE: tl.constexpr, BLOCK_M: tl.constexpr,
                            BLOCK_N: tl.constexpr):
    # Over this program's row tiles (grid: splits x channel blocks), with ghat = (act(t) - mean)*rstd:
    #   part[0|1|3, s, co] = sum dy | sum dy*ghat | sum ghat   (unless FORM_DT and TRAINING: already reduced)
    #   FORM_DT, TRAINING and APPLY_BN: ghat - dhat, centred on the exact mean of g (conv_act_bn_backward).
    #   FORM_DT: dT[m, co] = a*(dy - c1 - ghat*c2)*act'(t), an (M x Cout) row-major matrix; part[2, s, co] = sum dT.
    #     APPLY_BN (dy = dL/dy):  a = gamma*rstd, c1 = dbeta/M, c2 = dgamma/M in training (0 in eval);
    #     otherwise (dy = dL/dg, y = g; the mean and rstd outputs have gradients dmean, drstd):
    #       dg_total = dy + dmean/M - drstd*rstd^2*ghat/M, i.e. a = 1, c1 = -dmean/M, c2 = drstd*rstd^2/M.
    L = Ho * Wo
    M = N * L
    pid_s = tl.program_id(0)
    splits = tl.num_programs(0)
    total = N * tl.cdiv(L, BLOCK_M)
    per = tl.cdiv(total, splits)
    start = pid_s * per
    end = tl.minimum(start + per, total)
    co = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    co_ok = co < Cout
    mu = tl.load(mean_ptr + co, mask=co_ok, other=0.0).to(ACC)
    rs = tl.load(rstd_ptr + co, mask=co_ok, other=0.0).to(ACC)
    if APPLY_BN:
        a = tl.load(gamma_ptr + co, mask=co_ok, other=0.0).to(ACC) * rs
    else:
        a = tl.full([BLOCK_N], 1.0, ACC)
    dhat = tl.zeros([BLOCK_N], dtype=ACC)
    if FORM_DT and TRAINING and APPLY_BN:
        c1 = tl.load(dbeta_ptr + co, mask=co_ok, other=0.0).to(ACC) / M
        c2 = tl.load(dgamma_ptr + co, mask=co_ok, other=0.0).to(ACC) / M
        dhat = tl.load(dhat_ptr + co, mask=co_ok, other=0.0).to(ACC)
    elif FORM_DT and TRAINING:
        c1 = -tl.load(dmean_ptr + co, mask=co_ok, other=0.0).to(ACC) / M
        c2 = tl.load(drstd_ptr + co, mask=co_ok, other=0.0).to(ACC) * rs * rs / M
    else:
        c1 = tl.zeros([BLOCK_N], dtype=ACC)
        c2 = tl.zeros([BLOCK_N], dtype=ACC)
    sum_dy = tl.zeros([BLOCK_N], dtype=ACC)
    sum_dyg = tl.zeros([BLOCK_N], dtype=ACC)
    sum_dt = tl.zeros([BLOCK_N], dtype=ACC)
    sum_ghat = tl.zeros([BLOCK_N], dtype=ACC)
    for tile in range(start, end):
        n, l, m_ok = _row_tile(tile, L, BLOCK_M)
        ok = m_ok[:, None] & co_ok[None, :]
        ho = l // Wo
        wo = l % Wo
        t = tl.load(t_ptr + n * stn + co[None, :] * stc + (ho * sth + wo * stw)[:, None], mask=ok, other=0.0).to(ACC)
        dy = tl.load(dy_ptr + n * sdn + co[None, :] * sdc + (ho * sdh + wo * sdw)[:, None], mask=ok,
                     other=0.0).to(ACC)
        g = act_forward(t, ACT)
        if not APPLY_BN:  # the deferred BN normalized the stored g (csrc/cpu/conv_act_bn.cpp g_as_stored)
            g = g.to(G_DTYPE).to(ACC)
        ghat = (g - mu[None, :]) * rs[None, :] - dhat[None, :]
        sum_dy += tl.sum(dy, axis=0)
        sum_dyg += tl.sum(tl.where(ok, dy * ghat, 0.0), axis=0)
        sum_ghat += tl.sum(tl.where(ok, ghat, 0.0), axis=0)
        if FORM_DT:
            dt = tl.where(ok, a[None, :] * (dy - c1[None, :] - ghat * c2[None, :]) * act_backward(t, ACT), 0.0)
            rows = n * L + l
            tl.store(dT_ptr + rows[:, None] * Cout + co[None, :], dt.to(dT_ptr.dtype.element_ty), mask=ok)
            sum_dt += tl.sum(dt, axis=0)
    plane = splits.to(tl.int64) * Cout
    offs = pid_s.to(tl.int64) * Cout + co
    if not (FORM_DT and TRAINING):
        tl.store(part_ptr + offs, sum_dy, mask=co_ok)
        tl.store(part_ptr + plane + offs, sum_dyg, mask=co_ok)
        tl.store(part_ptr + 3 * plane + offs, sum_ghat, mask=co_ok)
    if FORM_DT:
        tl.store(part_ptr + 2 * plane + offs, sum_dt, mask=co_ok)


@triton.autotune(configs=_DW_CONFIGS, key=_KEY)
@triton.jit
def _cab_dweight_kernel(dT_ptr, x_ptr, part_ptr, N, Cin, Ho, Wo, Cout, Kd, sxn, sxc, sxh, sxw,
                        P: tl.constexpr, ACC: tl.constexpr, USE_DOT: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # part[s, co, kk] = sum_{m in split s} dT[m, co] * Z[m, kk]   (dW = dT^T Z, split along M;
    # grid: channel blocks x Kd blocks x splits; row tiles never straddle two images)
    L = Ho * Wo
    co = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    kk = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    co_ok = co < Cout
    k_ok = kk < Kd
    pid_s = tl.program_id(2)
    total = N * tl.cdiv(L, BLOCK_M)
    per = tl.cdiv(total, tl.num_programs(2))
    start = pid_s * per
    end = tl.minimum(start + per, total)
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32 if USE_DOT else ACC)
    for tile in range(start, end):
        n, l, m_ok = _row_tile(tile, L, BLOCK_M)
        rows = n * L + l
        dTt = tl.load(dT_ptr + rows[None, :] * Cout + co[:, None], mask=co_ok[:, None] & m_ok[None, :], other=0.0)
        z = tl.load(x_ptr + n * sxn + _patch_offsets(kk, l, Wo, sxc, sxh, sxw, P), mask=m_ok[:, None] & k_ok[None, :],
                    other=0.0)
        acc = _mma(dTt, z, acc, USE_DOT, ACC)
    tl.store(part_ptr + pid_s.to(tl.int64) * Cout * Kd + co[:, None] * Kd + kk[None, :], acc.to(ACC),
             mask=co_ok[:, None] & k_ok[None, :])


@triton.autotune(configs=_DZ_CONFIGS, key=_KEY)
@triton.jit
def _cab_dinput_kernel(dT_ptr, w_ptr, dx_ptr, N, Cin, Ho, Wo, Cout, Kd, sxn, sxc, sxh, sxw,
                       P: tl.constexpr, ACC: tl.constexpr, USE_DOT: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # dZ[m, kk] = sum_co dT[m, co] * W[co, kk], scattered to dx[n, ci, ho*P+pi, wo*P+pj]
    # (patches do not overlap: every covered element of dx is written exactly once)
    L = Ho * Wo
    n, l, m_ok = _row_tile(tl.program_id(0), L, BLOCK_M)
    kk = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    k_ok = kk < Kd
    rows = n * L + l
    acc = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32 if USE_DOT else ACC)
    for c0 in range(0, Cout, BLOCK_N):
        co = c0 + tl.arange(0, BLOCK_N)
        co_ok = co < Cout
        dTt = tl.load(dT_ptr + rows[:, None] * Cout + co[None, :], mask=m_ok[:, None] & co_ok[None, :], other=0.0)
        wt = tl.load(w_ptr + co[:, None] * Kd + kk[None, :], mask=co_ok[:, None] & k_ok[None, :], other=0.0)
        acc = _mma(dTt, wt, acc, USE_DOT, ACC)
    tl.store(dx_ptr + n * sxn + _patch_offsets(kk, l, Wo, sxc, sxh, sxw, P), acc.to(dx_ptr.dtype.element_ty),
             mask=m_ok[:, None] & k_ok[None, :])


# --- launchers --------------------------------------------------------------------------------------

def _check(op, x, weight, bias, gamma, beta, patch):
    check_activation(op, x)
    if patch < 1:
        raise RuntimeError(f"{op}: patch size must be >= 1, got {patch}")
    cin = x.shape[1]
    if weight.dim() != 4 or weight.shape[1] != cin or tuple(weight.shape[2:]) != (patch, patch):
        raise RuntimeError(f"{op}: weight must have shape (Cout, {cin}, {patch}, {patch}), got {tuple(weight.shape)}")
    if x.shape[2] < patch or x.shape[3] < patch:
        raise RuntimeError(f"{op}: input spatial size {tuple(x.shape[2:])} is smaller than the patch size {patch}")
    if weight.dtype != x.dtype or bias.dtype != x.dtype:
        raise RuntimeError(f"{op}: weight/bias dtype must match the input dtype {x.dtype}")
    cout = weight.shape[0]
    if bias.shape != (cout,):
        raise RuntimeError(f"{op}: bias must have shape ({cout},)")
    acc = acc_dtype(x.dtype)
    check_per_channel(op, "gamma", gamma, cout, acc, x.device)
    check_per_channel(op, "beta", beta, cout, acc, x.device)
    if x[0].numel() >= 2 ** 31:
        raise RuntimeError(f"{op}: one image of {x[0].numel()} elements exceeds the kernels' int32 per-image offsets")


def _output_like(x: torch.Tensor, cout: int, patch: int, dtype=None) -> torch.Tensor:
    n, _, h, w = x.shape
    fmt = torch.channels_last if is_channels_last(x) else torch.contiguous_format
    return torch.empty((n, cout, h // patch, w // patch), dtype=dtype or x.dtype, device=x.device, memory_format=fmt)


def _geom(x, weight, patch):
    N, Cin, H, W = x.shape
    return N, Cin, H, W, H // patch, W // patch, weight.shape[0], Cin * patch * patch


def _gemm(x, w2, bias, gamma, beta, mean, rstd, y, t, parts, mode, act, patch, store_t, apply_bn=True):
    N, Cin, H, W, Ho, Wo, Cout, Kd = _geom(x, w2, patch)
    out = y if y is not None else t
    assert t is None or t.stride() == out.stride()
    dummy = out  # pointer for arguments the mode never touches
    _cab_gemm_kernel[lambda m: (N * triton.cdiv(Ho * Wo, GEMM_BLOCK_M), triton.cdiv(Cout, m["BLOCK_N"]))](
        x, w2, bias, gamma, beta, mean if mean is not None else gamma, rstd if rstd is not None else gamma,
        y if y is not None else dummy, t if t is not None else dummy, parts if parts is not None else dummy,
        N, Cin, H, W, Ho, Wo, Cout, Kd, *x.stride(), *out.stride(), P=patch, MODE=mode, STORE_T=store_t,
        APPLY_BN=apply_bn, ACT=act, ACC=tl_acc(x.dtype), USE_DOT=x.dtype != torch.float64, BLOCK_M=GEMM_BLOCK_M)


def conv_act_bn_forward(x, weight, bias, gamma, beta, mean, rstd, batch_stats: bool, eps: float, act: int,
                        patch: int, save_t: bool, apply_bn: bool):
    """Returns [y, t, mean, rstd, var]; t = conv(x) + b when save_t (else empty); the batch statistics
    (biased var) when batch_stats (else empty). y = act(t) when apply_bn is false."""
    _check("conv_act_bn_forward", x, weight, bias, gamma, beta, patch)
    N, Cin, H, W, Ho, Wo, Cout, Kd = _geom(x, weight, patch)
    if use_exact_training(x.dtype, batch_stats, N * Ho * Wo):
        o = conv_act_bn_forward(*f64(x, weight, bias, gamma, beta, mean, rstd), batch_stats, eps, act, patch, save_t,
                                apply_bn)
        y = o[0].to(x.dtype)
        if not apply_bn:  # the moments of the stored g, which the next block normalizes (as the CPU backend)
            g = y.double()
            m = g.mean((0, 2, 3))
            v = (g - m.view(1, -1, 1, 1)).square().mean((0, 2, 3))
            return [y, o[1].to(x.dtype), m.to(gamma.dtype), (v + eps).rsqrt().to(gamma.dtype), v.to(gamma.dtype)]
        return [y, o[1].to(x.dtype)] + [v.to(gamma.dtype) for v in o[2:]]
    acc = acc_dtype(x.dtype)
    w2 = weight.reshape(Cout, Kd).contiguous()
    y = new_output(_output_like(x, Cout, patch))
    t = new_output(_output_like(x, Cout, patch)) if save_t else x.new_empty(0)
    empty = torch.empty(0, dtype=gamma.dtype, device=x.device)
    if not batch_stats:
        check_per_channel("conv_act_bn_forward", "mean", mean, Cout, acc, x.device)
        check_per_channel("conv_act_bn_forward", "rstd", rstd, Cout, acc, x.device)
        _gemm(x, w2, bias, gamma, beta, mean, rstd, y, t if save_t else None, None, MODE_APPLY, act, patch, save_t,
              apply_bn)
        return [y, t, empty, empty.clone(), empty.clone()]
    t_work = t if save_t else new_output(_output_like(x, Cout, patch))  # scratch t between the two passes
    R = N * triton.cdiv(Ho * Wo, GEMM_BLOCK_M)
    parts = new_output(torch.empty((3, R, Cout), dtype=acc, device=x.device))
    _gemm(x, w2, bias, gamma, beta, None, None, None if apply_bn else y, t_work, parts, MODE_STATS, act, patch, True,
          apply_bn)
    mean = new_output(torch.empty(Cout, dtype=gamma.dtype, device=x.device))
    rstd = new_output(torch.empty_like(mean))
    var = new_output(torch.empty_like(mean))
    finalize_stats(parts, eps, mean, var, rstd)
    if not apply_bn:  # y = act(t) was written by the GEMM epilogue
        return [y, t, mean, rstd, var]
    assert t_work.stride() == y.stride()
    _cab_apply_kernel[lambda m: (N * triton.cdiv(Ho * Wo, m["BLOCK_M"]), triton.cdiv(Cout, m["BLOCK_N"]))](
        t_work, gamma, beta, mean, rstd, y, N, Cin, Ho, Wo, Cout, patch, *y.stride(), ACT=act, ACC=tl_acc(x.dtype))
    return [y, t, mean, rstd, var]


def conv_act_bn_backward(dy, x, weight, bias, gamma, mean, rstd, t, dmean, drstd, batch_stats: bool, act: int,
                         patch: int, apply_bn: bool, need_dx: bool, g_dtype: torch.dtype | None = None):
    """Returns [dx, dweight, dbias, dgamma, dbeta]; an empty t is recomputed from x (MODE_T GEMM).
    apply_bn false: dy is dL/d act(t), dmean/drstd (empty: zero) the gradients of the batch mean and
    rstd; dgamma = dbeta = 0. need_dx false: dx is empty and dZ = dT W is not formed. g_dtype: the dtype
    the forward stored g in when it deferred the BN apply (default x's)."""
    _check("conv_act_bn_backward", x, weight, bias, gamma, gamma, patch)
    N, Cin, H, W, Ho, Wo, Cout, Kd = _geom(x, weight, patch)
    if use_exact_training(x.dtype, batch_stats, N * Ho * Wo):
        # t is recomputed in fp64 from x (a saved t is rounded to x's dtype)
        o = conv_act_bn_backward(*f64(dy, x, weight, bias, gamma, mean, rstd), None, *f64(dmean, drstd), batch_stats,
                                 act, patch, apply_bn, need_dx, g_dtype or x.dtype)
        return [o[0].to(x.dtype), o[1].to(weight.dtype), o[2].to(bias.dtype), o[3].to(gamma.dtype),
                o[4].to(gamma.dtype)]
    if tuple(dy.shape) != (N, Cout, Ho, Wo) or dy.dtype != x.dtype:
        raise RuntimeError(f"conv_act_bn_backward: grad_output {dy.dtype} {tuple(dy.shape)}, expected {x.dtype} "
                           f"({N}, {Cout}, {Ho}, {Wo})")
    acc = acc_dtype(x.dtype)
    ACC = tl_acc(x.dtype)
    USE_DOT = x.dtype != torch.float64
    check_per_channel("conv_act_bn_backward", "mean", mean, Cout, acc, x.device)
    check_per_channel("conv_act_bn_backward", "rstd", rstd, Cout, acc, x.device)
    if not apply_bn:
        dmean = dmean if dmean.numel() else torch.zeros_like(mean)
        drstd = drstd if drstd.numel() else torch.zeros_like(rstd)
        check_per_channel("conv_act_bn_backward", "dmean", dmean, Cout, acc, x.device)
        check_per_channel("conv_act_bn_backward", "drstd", drstd, Cout, acc, x.device)
    else:
        dmean = drstd = mean  # never read
    fmt = memory_format_of(x)
    dy = dy.contiguous(memory_format=fmt)
    w2 = weight.reshape(Cout, Kd).contiguous()
    if t is None or t.numel() == 0:
        t = new_output(_output_like(x, Cout, patch))
        _gemm(x, w2, bias, gamma, gamma, None, None, None, t, None, MODE_T, act, patch, True)
    dx = new_output(torch.empty_like(x, memory_format=fmt)) if need_dx else x.new_empty(0)
    dweight = new_output(torch.empty_like(weight, memory_format=torch.contiguous_format))
    dbias = new_output(torch.empty_like(bias))
    dgamma = new_output(torch.empty_like(gamma))
    dbeta = new_output(torch.empty_like(gamma))
    dT = new_output(torch.empty((N * Ho * Wo, Cout), dtype=x.dtype, device=x.device))
    S = max(1, min(N * triton.cdiv(Ho * Wo, 32), triton.cdiv(num_programs_hint(x.device), triton.cdiv(Cout, 64))))
    # sum dy, sum dy*ghat, sum dT, sum ghat
    parts = new_output(torch.empty((4, S, Cout), dtype=acc, device=x.device))
    dhat = torch.zeros(Cout, dtype=acc, device=x.device)
    G_DTYPE = _TL_DTYPES[g_dtype or x.dtype]

    def dt_pass(form_dt):
        _cab_backward_dt_kernel[lambda m: (S, triton.cdiv(Cout, m["BLOCK_N"]))](
            dy, t, gamma, mean, rstd, dbeta, dgamma, dhat, dmean, drstd, dT, parts, N, Cin, Ho, Wo, Cout, patch,
            *dy.stride(), *t.stride(), FORM_DT=form_dt, TRAINING=batch_stats, APPLY_BN=apply_bn, ACT=act, ACC=ACC,
            G_DTYPE=G_DTYPE)

    if not apply_bn:  # no reduction pass: the coefficients come from dmean/drstd; gamma and beta unused
        dt_pass(True)
        dgamma.zero_()
        dbeta.zero_()
    elif batch_stats:
        dt_pass(False)
        sum_rows(parts[0], dbeta)   # dbeta = sum dy
        sum_rows(parts[1], dgamma)  # dgamma = sum dy*ghat
        # Centre ghat on the exact mean of g (the saved mean is rounded; see triton/dw_block.py
        # dw_block_backward): dhat = mean(ghat), dgamma = sum dy*(ghat - dhat).
        sum_rows(parts[3], dhat)
        dhat.div_(N * Ho * Wo)
        dgamma.sub_(dhat * dbeta)
        dt_pass(True)
    else:
        dt_pass(True)
        sum_rows(parts[0], dbeta)
        sum_rows(parts[1], dgamma)
    sum_rows(parts[2], dbias)

    S_w = max(1, min(N * triton.cdiv(Ho * Wo, 64),
                     triton.cdiv(num_programs_hint(x.device), triton.cdiv(Cout, 64) * triton.cdiv(Kd, 64))))
    part_dw = new_output(torch.empty((S_w, Cout, Kd), dtype=acc, device=x.device))
    _cab_dweight_kernel[lambda m: (triton.cdiv(Cout, m["BLOCK_N"]), triton.cdiv(Kd, m["BLOCK_K"]), S_w)](
        dT, x, part_dw, N, Cin, Ho, Wo, Cout, Kd, *x.stride(), P=patch, ACC=ACC, USE_DOT=USE_DOT)
    sum_rows(part_dw, dweight)
    if not need_dx:
        return [dx, dweight, dbias, dgamma, dbeta]
    _cab_dinput_kernel[lambda m: (N * triton.cdiv(Ho * Wo, m["BLOCK_M"]), triton.cdiv(Kd, m["BLOCK_K"]))](
        dT, w2, dx, N, Cin, Ho, Wo, Cout, Kd, *dx.stride(), P=patch, ACC=ACC, USE_DOT=USE_DOT)
    if H % patch:  # input rows / columns no patch covers (torch zero_ on those slices only)
        dx[:, :, Ho * patch:, :].zero_()
    if W % patch:
        dx[:, :, :, Wo * patch:].zero_()
    return [dx, dweight, dbias, dgamma, dbeta]
