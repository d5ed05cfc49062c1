"""Fused depthwise block in Triton:  y = u + gamma * (act(dwconv_k(u) + b) - mean) * rstd + beta,
with u = x, or u = in_scale[c]*x + in_shift[c] when the previous pointwise block's BN apply is folded
into this block's loads (AFFINE; zero padding is of u, so out-of-image taps stay 0).

Tiling: a program (or one loop iteration of a reduction program) owns a "tile" = BLOCK_P consecutive
pixels (h*W + w) of one image n x BLOCK_C channels. All addressing goes through the tensors' strides,
so NCHW and channels_last share the kernels; in channels_last (the GPU fast path) the channel axis has
stride 1 and Triton's stride-1 specialization vectorizes the loads along it. The k x k halo of a tile
is read through the cache (each tap is a shifted, masked load of the same tile). Offsets are int64
across images (n * stride_n); within one image they are int32 (the launchers check C*H*W < 2^31).

Passes:
  eval forward     : _dw_forward_apply_kernel (conv + bias + act + BN affine + residual), one pass.
  training forward : _dw_forward_stats_kernel (per-program Chan/Welford partials of g = act(t)),
                     common._bn_stats_finalize_kernel (merge -> mean/var/rstd), then the apply kernel.
  backward         : [training] _dw_backward_reduce_kernel (partial sum(dy), sum(dy*ghat), t recomputed)
                     -> sums; _dw_backward_dt_kernel (dt into an fp32 scratch, partial dw/db, and in eval
                     also the dy sums); _dw_backward_dx_kernel (du = dy + conv_transpose(dt); dx = du,
                     or in_scale*du with partial sums of du*x and du for the input affine's gradients);
                     common._sum_rows_kernel reduces every partial buffer in a fixed order.
Reductions run on a (splits x channel blocks) grid; each program loops over a contiguous range of
tiles, so partial buffers are [splits, C] regardless of the tile size (which autotuning may change).

fp64 inputs are computed in fp64 (ACC = tl.float64); fp32/fp16/bf16 accumulate in fp32.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import (INTERPRET, act_backward, act_forward, acc_dtype, check_activation, check_per_channel,
                     finalize_stats, memory_format_of, new_output, num_programs_hint, sum_rows, tile_moments, tl_acc, welford_merge)

if INTERPRET:
    _CONFIGS = [triton.Config({"BLOCK_P": 32, "BLOCK_C": 16}, num_warps=1)]
else:  # Hopper/Ampere: memory-bound; channel blocks of 32-64 fp32/bf16 lanes, 4-8 warps.
    _CONFIGS = [triton.Config({"BLOCK_P": p, "BLOCK_C": c}, num_warps=w)
                for p, c, w in ((32, 32, 4), (64, 32, 4), (32, 64, 4), (64, 64, 8), (128, 32, 8), (16, 128, 4))]
_KEY = ["N", "C", "H", "W", "K"]


# --- device helpers ---------------------------------------------------------------------------------

@triton.jit
def _tile_coords(tile, H, W, C, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, pid_c):
    # tile -> (image n, pixel offsets hw, rows h, cols w, channel offsets c, masks)
    tiles_per_img = tl.cdiv(H * W, BLOCK_P)
    n = tile // tiles_per_img
    hw = (tile % tiles_per_img) * BLOCK_P + tl.arange(0, BLOCK_P)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    return n.to(tl.int64), hw, hw // W, hw % W, c, hw < H * W, c < C


@triton.jit
def _split_tiles(N, H, W, BLOCK_P: tl.constexpr):
    # Reduction programs (grid: splits x channel blocks): program s owns the contiguous tile range
    # [start, end) of the N * cdiv(H*W, BLOCK_P) pixel tiles -> (s, splits, start, end)
    pid_s = tl.program_id(0)
    splits = tl.num_programs(0)
    total = N * tl.cdiv(H * W, BLOCK_P)
    per = tl.cdiv(total, splits)
    start = pid_s * per
    return pid_s, splits, start, tl.minimum(start + per, total)


@triton.jit
def _input_affine(scale_ptr, shift_ptr, c, c_ok, AFFINE: tl.constexpr, ACC: tl.constexpr):
    # per-channel (scale, shift) of u = scale*x + shift; (1, 0) without an input affine
    if AFFINE:
        return (tl.load(scale_ptr + c, mask=c_ok, other=0.0).to(ACC),
                tl.load(shift_ptr + c, mask=c_ok, other=0.0).to(ACC))
    else:
        return tl.full(c.shape, 1.0, ACC), tl.zeros(c.shape, ACC)


@triton.jit
def _load_u(ptrs, mask, scale, shift, AFFINE: tl.constexpr, ACC: tl.constexpr):
    # u = scale*x + shift on in-bounds elements, 0 elsewhere (the zero padding is of u)
    xv = tl.load(ptrs, mask=mask, other=0.0).to(ACC)
    if AFFINE:
        xv = tl.where(mask, xv * scale[None, :] + shift[None, :], 0.0)
    return xv


@triton.jit
def _dw_conv_tile(x_ptr, scale, shift, w_ptr, b_ptr, n, h, w, c, p_ok, c_ok, H, W, sxn, sxc, sxh, sxw,
                  K: tl.constexpr, AFFINE: tl.constexpr, ACC: tl.constexpr, BLOCK_P: tl.constexpr,
                  BLOCK_C: tl.constexpr):
    # t[p, c] = b[c] + sum_{i,j} w[c,0,i,j] * u[n, c, h+i-pl, w+j-pl]   (zero padding, pl = (k-1)//2)
    PL: tl.constexpr = (K - 1) // 2
    base = x_ptr + n * sxn + c[None, :] * sxc
    acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=ACC) + tl.load(b_ptr + c, mask=c_ok, other=0.0).to(ACC)[None, :]
    for i in tl.static_range(K):
        hi = h + (i - PL)
        row_ok = p_ok & (hi >= 0) & (hi < H)
        for j in tl.static_range(K):
            wj = w + (j - PL)
            ok = row_ok & (wj >= 0) & (wj < W)
            xv = _load_u(base + (hi * sxh + wj * sxw)[:, None], ok[:, None] & c_ok[None, :], scale, shift, AFFINE, ACC)
            wv = tl.load(w_ptr + c * (K * K) + (i * K + j), mask=c_ok, other=0.0)
            acc += xv * wv.to(ACC)[None, :]
    return acc


# --- forward ----------------------------------------------------------------------------------------

@triton.autotune(configs=_CONFIGS, key=_KEY)
@triton.jit
def _dw_forward_apply_kernel(x_ptr, in_scale_ptr, in_shift_ptr, w_ptr, b_ptr, gamma_ptr, beta_ptr, mean_ptr,
                             rstd_ptr, y_ptr, N, C, H, W, sxn, sxc, sxh, sxw, syn, syc, syh, syw,
                             K: tl.constexpr, ACT: tl.constexpr, AFFINE: tl.constexpr, ACC: tl.constexpr,
                             BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    # y = u + A[c]*act(t) + B[c],  A = gamma*rstd, B = beta - mean*A   (eval, and training's apply pass)
    n, hw, h, w, c, p_ok, c_ok = _tile_coords(tl.program_id(0), H, W, C, BLOCK_P, BLOCK_C, tl.program_id(1))
    isc, ish = _input_affine(in_scale_ptr, in_shift_ptr, c, c_ok, AFFINE, ACC)
    t = _dw_conv_tile(x_ptr, isc, ish, w_ptr, b_ptr, n, h, w, c, p_ok, c_ok, H, W, sxn, sxc, sxh, sxw, K, AFFINE, ACC,
                      BLOCK_P, BLOCK_C)
    g = act_forward(t, ACT)
    scale = tl.load(gamma_ptr + c, mask=c_ok, other=0.0).to(ACC) * tl.load(rstd_ptr + c, mask=c_ok, other=0.0).to(ACC)
    shift = tl.load(beta_ptr + c, mask=c_ok, other=0.0).to(ACC) - tl.load(mean_ptr + c, mask=c_ok, other=0.0).to(ACC) * scale
    ok = p_ok[:, None] & c_ok[None, :]
    xv = _load_u(x_ptr + n * sxn + c[None, :] * sxc + (h * sxh + w * sxw)[:, None], ok, isc, ish, AFFINE, ACC)
    y = xv + g * scale[None, :] + shift[None, :]
    tl.store(y_ptr + n * syn + c[None, :] * syc + (h * syh + w * syw)[:, None], y.to(y_ptr.dtype.element_ty), mask=ok)


@triton.autotune(configs=_CONFIGS, key=_KEY)
@triton.jit
def _dw_forward_stats_kernel(x_ptr, in_scale_ptr, in_shift_ptr, w_ptr, b_ptr, part_ptr, N, C, H, W,
                             sxn, sxc, sxh, sxw, K: tl.constexpr, ACT: tl.constexpr, AFFINE: tl.constexpr,
                             ACC: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    # part[:, s, c] = (count, mean, M2) of g = act(t) over this program's tiles: per tile exact moments,
    # merged tile by tile with Chan's rule (never E[g^2] - E[g]^2).
    pid_s, splits, start, end = _split_tiles(N, H, W, BLOCK_P)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    isc, ish = _input_affine(in_scale_ptr, in_shift_ptr, c, c < C, AFFINE, ACC)
    n_acc = tl.zeros([BLOCK_C], dtype=ACC)
    mean_acc = tl.zeros([BLOCK_C], dtype=ACC)
    m2_acc = tl.zeros([BLOCK_C], dtype=ACC)
    for tile in range(start, end):
        n, hw, h, w, c, p_ok, c_ok = _tile_coords(tile, H, W, C, BLOCK_P, BLOCK_C, tl.program_id(1))
        t = _dw_conv_tile(x_ptr, isc, ish, w_ptr, b_ptr, n, h, w, c, p_ok, c_ok, H, W, sxn, sxc, sxh, sxw, K, AFFINE,
                          ACC, BLOCK_P, BLOCK_C)
        g = act_forward(t, ACT)
        count = tl.sum(p_ok.to(ACC), axis=0)
        mean_b, m2_b = tile_moments(g, p_ok[:, None], count)
        n_acc, mean_acc, m2_acc = welford_merge(n_acc, mean_acc, m2_acc, count, mean_b, m2_b)
    c_ok = c < C
    plane = splits.to(tl.int64) * C
    offs = pid_s.to(tl.int64) * C + c
    tl.store(part_ptr + offs, n_acc, mask=c_ok)
    tl.store(part_ptr + plane + offs, mean_acc, mask=c_ok)
    tl.store(part_ptr + 2 * plane + offs, m2_acc, mask=c_ok)


# --- backward ---------------------------------------------------------------------------------------

@triton.jit
def _ghat_tile(x_ptr, isc, ish, w_ptr, b_ptr, mean_ptr, rstd_ptr, n, h, w, c, p_ok, c_ok, H, W, sxn, sxc, sxh, sxw,
               K: tl.constexpr, ACT: tl.constexpr, AFFINE: tl.constexpr, ACC: tl.constexpr, BLOCK_P: tl.constexpr,
               BLOCK_C: tl.constexpr):
    # (t, ghat = (act(t) - mean) * rstd) with t recomputed from u
    t = _dw_conv_tile(x_ptr, isc, ish, w_ptr, b_ptr, n, h, w, c, p_ok, c_ok, H, W, sxn, sxc, sxh, sxw, K, AFFINE, ACC,
                      BLOCK_P, BLOCK_C)
    mu = tl.load(mean_ptr + c, mask=c_ok, other=0.0).to(ACC)
    rs = tl.load(rstd_ptr + c, mask=c_ok, other=0.0).to(ACC)
    return t, (act_forward(t, ACT) - mu[None, :]) * rs[None, :]


@triton.autotune(configs=_CONFIGS, key=_KEY)
@triton.jit
def _dw_backward_reduce_kernel(dy_ptr, x_ptr, in_scale_ptr, in_shift_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr, part_ptr,
                               N, C, H, W, sxn, sxc, sxh, sxw, sdn, sdc, sdh, sdw,
                               K: tl.constexpr, ACT: tl.constexpr, AFFINE: tl.constexpr, ACC: tl.constexpr,
                               BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    # part[0, s, c] = sum dy,  part[1, s, c] = sum dy*ghat  over this program's tiles (t recomputed)
    pid_s, splits, start, end = _split_tiles(N, H, W, BLOCK_P)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    isc, ish = _input_affine(in_scale_ptr, in_shift_ptr, c, c < C, AFFINE, ACC)
    sum_dy = tl.zeros([BLOCK_C], dtype=ACC)
    sum_dyg = tl.zeros([BLOCK_C], dtype=ACC)
    for tile in range(start, end):
        n, hw, h, w, c, p_ok, c_ok = _tile_coords(tile, H, W, C, BLOCK_P, BLOCK_C, tl.program_id(1))
        t, ghat = _ghat_tile(x_ptr, isc, ish, w_ptr, b_ptr, mean_ptr, rstd_ptr, n, h, w, c, p_ok, c_ok, H, W,
                             sxn, sxc, sxh, sxw, K, ACT, AFFINE, ACC, BLOCK_P, BLOCK_C)
        ok = p_ok[:, None] & c_ok[None, :]
        dy = tl.load(dy_ptr + n * sdn + c[None, :] * sdc + (h * sdh + w * sdw)[:, None], mask=ok, other=0.0).to(ACC)
        sum_dy += tl.sum(dy, axis=0)
        sum_dyg += tl.sum(tl.where(ok, dy * ghat, 0.0), axis=0)
    c_ok = c < C
    offs = pid_s.to(tl.int64) * C + c
    tl.store(part_ptr + offs, sum_dy, mask=c_ok)
    tl.store(part_ptr + splits.to(tl.int64) * C + offs, sum_dyg, mask=c_ok)


@triton.autotune(configs=_CONFIGS, key=_KEY)
@triton.jit
def _dw_backward_dt_kernel(dy_ptr, x_ptr, in_scale_ptr, in_shift_ptr, w_ptr, b_ptr, gamma_ptr, mean_ptr, rstd_ptr,
                           dbeta_ptr, dgamma_ptr, dt_ptr, part_dw_ptr, part_db_ptr, part_dy_ptr, M, N, C, H, W,
                           sxn, sxc, sxh, sxw, sdn, sdc, sdh, sdw, stn, stc, sth, stw,
                           K: tl.constexpr, ACT: tl.constexpr, AFFINE: tl.constexpr, ACC: tl.constexpr,
                           TRAINING: tl.constexpr,
                           KK_PAD: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    # dt = gamma*rstd*(dy - c1 - ghat*c2) * act'(t)   (training: c1 = dbeta/M = sum(dy)/M,
    #                                                  c2 = dgamma/M = sum(dy*ghat)/M; eval: c1 = c2 = 0)
    # dt is stored (fp32/fp64 scratch, x's layout) for the dx pass; per program partials:
    #   part_dw[s, c, i*k+j] = sum dt[n,c,h,w] * u[n,c,h+i-pl,w+j-pl],  part_db[s, c] = sum dt,
    #   eval only: part_dy[0|1, s, c] = sum dy | sum dy*ghat (dbeta, dgamma; training had its own pass).
    PL: tl.constexpr = (K - 1) // 2
    pid_s, splits, start, end = _split_tiles(N, H, W, BLOCK_P)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    isc, ish = _input_affine(in_scale_ptr, in_shift_ptr, c, c_ok, AFFINE, ACC)
    a = tl.load(gamma_ptr + c, mask=c_ok, other=0.0).to(ACC) * tl.load(rstd_ptr + c, mask=c_ok, other=0.0).to(ACC)
    if TRAINING:
        c1 = tl.load(dbeta_ptr + c, mask=c_ok, other=0.0).to(ACC) / M
        c2 = tl.load(dgamma_ptr + c, mask=c_ok, other=0.0).to(ACC) / M
    else:
        c1 = tl.zeros([BLOCK_C], dtype=ACC)
        c2 = tl.zeros([BLOCK_C], dtype=ACC)
    taps = tl.arange(0, KK_PAD)
    dw_acc = tl.zeros([KK_PAD, BLOCK_C], dtype=ACC)
    db_acc = tl.zeros([BLOCK_C], dtype=ACC)
    sum_dy = tl.zeros([BLOCK_C], dtype=ACC)
    sum_dyg = tl.zeros([BLOCK_C], dtype=ACC)
    for tile in range(start, end):
        n, hw, h, w, c, p_ok, c_ok = _tile_coords(tile, H, W, C, BLOCK_P, BLOCK_C, tl.program_id(1))
        t, ghat = _ghat_tile(x_ptr, isc, ish, w_ptr, b_ptr, mean_ptr, rstd_ptr, n, h, w, c, p_ok, c_ok, H, W,
                             sxn, sxc, sxh, sxw, K, ACT, AFFINE, ACC, BLOCK_P, BLOCK_C)
        ok = p_ok[:, None] & c_ok[None, :]
        dy = tl.load(dy_ptr + n * sdn + c[None, :] * sdc + (h * sdh + w * sdw)[:, None], mask=ok, other=0.0).to(ACC)
        dt = a[None, :] * (dy - c1[None, :] - ghat * c2[None, :]) * act_backward(t, ACT)
        dt = tl.where(ok, dt, 0.0)
        tl.store(dt_ptr + n * stn + c[None, :] * stc + (h * sth + w * stw)[:, None], dt, mask=ok)
        db_acc += tl.sum(dt, axis=0)
        if not TRAINING:
            sum_dy += tl.sum(dy, axis=0)
            sum_dyg += tl.sum(tl.where(ok, dy * ghat, 0.0), axis=0)
        base = x_ptr + n * sxn + c[None, :] * sxc
        for i in tl.static_range(K):
            hi = h + (i - PL)
            row_ok = p_ok & (hi >= 0) & (hi < H)
            for j in tl.static_range(K):
                wj = w + (j - PL)
                m = row_ok & (wj >= 0) & (wj < W)
                xv = _load_u(base + (hi * sxh + wj * sxw)[:, None], m[:, None] & c_ok[None, :], isc, ish, AFFINE, ACC)
                contrib = tl.sum(dt * xv, axis=0)
                dw_acc += tl.where(taps[:, None] == i * K + j, contrib[None, :], 0.0)
    c_ok = c < C
    s64 = pid_s.to(tl.int64)
    tl.store(part_dw_ptr + s64 * C * (K * K) + c[None, :] * (K * K) + taps[:, None], dw_acc,
             mask=(taps < K * K)[:, None] & c_ok[None, :])
    tl.store(part_db_ptr + s64 * C + c, db_acc, mask=c_ok)
    if not TRAINING:
        tl.store(part_dy_ptr + s64 * C + c, sum_dy, mask=c_ok)
        tl.store(part_dy_ptr + splits.to(tl.int64) * C + s64 * C + c, sum_dyg, mask=c_ok)


@triton.autotune(configs=_CONFIGS, key=_KEY)
@triton.jit
def _dw_backward_dx_kernel(dy_ptr, dt_ptr, w_ptr, x_ptr, in_scale_ptr, dx_ptr, part_ptr, N, C, H, W,
                           sdn, sdc, sdh, sdw, stn, stc, sth, stw, sxn, sxc, sxh, sxw,
                           K: tl.constexpr, AFFINE: tl.constexpr, ACC: tl.constexpr, BLOCK_P: tl.constexpr,
                           BLOCK_C: tl.constexpr):
    # du[n,c,h,w] = dy[n,c,h,w] + sum_{i,j} w[c,0,i,j] * dt[n,c,h-i+pl,w-j+pl]   (residual + conv_transpose)
    # dx = du, or with the input affine u = scale*x + shift: dx = scale*du and per program partials
    #   part[0, s, c] = sum du*x (d scale),  part[1, s, c] = sum du (d shift)
    PL: tl.constexpr = (K - 1) // 2
    pid_s, splits, start, end = _split_tiles(N, H, W, BLOCK_P)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    isc, _unused = _input_affine(in_scale_ptr, in_scale_ptr, c, c < C, AFFINE, ACC)
    sum_dux = tl.zeros([BLOCK_C], dtype=ACC)
    sum_du = tl.zeros([BLOCK_C], dtype=ACC)
    for tile in range(start, end):
        n, hw, h, w, c, p_ok, c_ok = _tile_coords(tile, H, W, C, BLOCK_P, BLOCK_C, tl.program_id(1))
        ok = p_ok[:, None] & c_ok[None, :]
        acc = tl.load(dy_ptr + n * sdn + c[None, :] * sdc + (h * sdh + w * sdw)[:, None], mask=ok, other=0.0).to(ACC)
        base = dt_ptr + n * stn + c[None, :] * stc
        for i in tl.static_range(K):
            hi = h - (i - PL)
            row_ok = p_ok & (hi >= 0) & (hi < H)
            for j in tl.static_range(K):
                wj = w - (j - PL)
                m = row_ok & (wj >= 0) & (wj < W)
                dtv = tl.load(base + (hi * sth + wj * stw)[:, None], mask=m[:, None] & c_ok[None, :], other=0.0)
                wv = tl.load(w_ptr + c * (K * K) + (i * K + j), mask=c_ok, other=0.0).to(ACC)
                acc += dtv.to(ACC) * wv[None, :]
        x_offs = n * sxn + c[None, :] * sxc + (h * sxh + w * sxw)[:, None]
        if AFFINE:
            xv = tl.load(x_ptr + x_offs, mask=ok, other=0.0).to(ACC)
            sum_dux += tl.sum(tl.where(ok, acc * xv, 0.0), axis=0)
            sum_du += tl.sum(tl.where(ok, acc, 0.0), axis=0)
            acc = acc * isc[None, :]
        tl.store(dx_ptr + x_offs, acc.to(dx_ptr.dtype.element_ty), mask=ok)
    if AFFINE:
        c_ok = c < C
        offs = pid_s.to(tl.int64) * C + c
        tl.store(part_ptr + offs, sum_dux, mask=c_ok)
        tl.store(part_ptr + splits.to(tl.int64) * C + offs, sum_du, mask=c_ok)


# --- launchers --------------------------------------------------------------------------------------

def _check(op, x, in_scale, in_shift, weight, bias, gamma, beta, mean, rstd, batch_stats):
    check_activation(op, x)
    C = x.shape[1]
    if weight.dim() != 4 or tuple(weight.shape[:2]) != (C, 1) or weight.shape[2] != weight.shape[3]:
        raise RuntimeError(f"{op}: weight must have shape ({C}, 1, k, k), got {tuple(weight.shape)}")
    if weight.dtype != x.dtype or bias.dtype != x.dtype:
        raise RuntimeError(f"{op}: weight/bias dtype must match the input dtype {x.dtype}")
    if bias.shape != (C,) or not bias.is_contiguous():
        raise RuntimeError(f"{op}: bias must be a contiguous ({C},) tensor")
    acc = acc_dtype(x.dtype)
    for name, t in (("gamma", gamma), ("beta", beta)) + ((("mean", mean), ("rstd", rstd)) if not batch_stats else ()):
        check_per_channel(op, name, t, C, acc, x.device)
    if in_scale.numel() != in_shift.numel():
        raise RuntimeError(f"{op}: in_scale and in_shift must both be empty or both have {C} elements, got "
                           f"{tuple(in_scale.shape)} and {tuple(in_shift.shape)}")
    if in_scale.numel():
        check_per_channel(op, "in_scale", in_scale, C, acc, x.device)
        check_per_channel(op, "in_shift", in_shift, C, acc, x.device)
    if C * x.shape[2] * x.shape[3] >= 2 ** 31:
        raise RuntimeError(f"{op}: one image of {C}x{x.shape[2]}x{x.shape[3]} elements exceeds the kernels' "
                           f"int32 per-image offsets")


def _splits(x: torch.Tensor, C: int) -> int:
    # Programs along the reduced (pixel) axis of a reduction kernel: enough to fill the device.
    c_blocks = triton.cdiv(C, 64)
    tiles = x.shape[0] * triton.cdiv(x.shape[2] * x.shape[3], 32)
    return max(1, min(tiles, triton.cdiv(num_programs_hint(x.device), c_blocks)))


def _forward_stats(x, in_scale, in_shift, weight, bias, affine, eps, act):
    """Training pass 1: (mean, rstd, var) of g = act(dwconv(u) + b) over the batch (biased var)."""
    N, C, H, W = x.shape
    S = _splits(x, C)
    acc = acc_dtype(x.dtype)
    parts = new_output(torch.empty((3, S, C), dtype=acc, device=x.device))
    _dw_forward_stats_kernel[lambda m: (S, triton.cdiv(C, m["BLOCK_C"]))](
        x, in_scale, in_shift, weight, bias, parts, N, C, H, W, *x.stride(), K=weight.shape[2], ACT=act,
        AFFINE=affine, ACC=tl_acc(x.dtype))
    mean = new_output(torch.empty(C, dtype=acc, device=x.device))
    rstd = new_output(torch.empty_like(mean))
    var = new_output(torch.empty_like(mean))
    finalize_stats(parts, eps, mean, var, rstd)
    return mean, rstd, var


def dw_block_forward(x, in_scale, in_shift, weight, bias, gamma, beta, mean, rstd, batch_stats: bool, eps: float,
                     act: int):
    """Returns [y, mean, rstd, var]: the batch statistics (biased var) when batch_stats, else empty.
    The block's input is u = in_scale*x + in_shift per channel, or x when both are empty."""
    _check("dw_block_forward", x, in_scale, in_shift, weight, bias, gamma, beta, mean, rstd, batch_stats)
    N, C, H, W = x.shape
    weight = weight.contiguous()
    affine = in_scale.numel() > 0
    if not affine:
        in_scale = in_shift = gamma  # never read (AFFINE=False)
    y = new_output(torch.empty_like(x))
    empty = torch.empty(0, dtype=gamma.dtype, device=x.device)
    if batch_stats:
        mean, rstd, var = _forward_stats(x, in_scale, in_shift, weight, bias, affine, eps, act)
    _dw_forward_apply_kernel[lambda m: (N * triton.cdiv(H * W, m["BLOCK_P"]), triton.cdiv(C, m["BLOCK_C"]))](
        x, in_scale, in_shift, weight, bias, gamma, beta, mean, rstd, y, N, C, H, W, *x.stride(), *y.stride(),
        K=weight.shape[2], ACT=act, AFFINE=affine, ACC=tl_acc(x.dtype))
    if not batch_stats:
        return [y, empty, empty, empty.clone()]
    return [y, mean, rstd, var]


def dw_block_batch_stats(x, in_scale, in_shift, weight, bias, act: int):
    """Synchronized BN, forward pass 1: [mean, var] (biased) of g over this call's batch; no output."""
    unused = torch.zeros(x.shape[1], dtype=acc_dtype(x.dtype), device=x.device)
    _check("dw_block_batch_stats", x, in_scale, in_shift, weight, bias, unused, unused, unused, unused, True)
    affine = in_scale.numel() > 0
    if not affine:
        in_scale = in_shift = unused
    mean, _, var = _forward_stats(x, in_scale, in_shift, weight.contiguous(), bias, affine, 1.0, act)  # rstd unused
    return [mean, var]


def _backward_reduce(dy, x, in_scale, in_shift, weight, bias, mean, rstd, affine, act, part_dy, dbeta, dgamma):
    """Backward pass 1: dbeta = sum dy, dgamma = sum dy*ghat (per-program partials in part_dy)."""
    N, C, H, W = x.shape
    S = part_dy.shape[1]
    _dw_backward_reduce_kernel[lambda m: (S, triton.cdiv(C, m["BLOCK_C"]))](
        dy, x, in_scale, in_shift, weight, bias, mean, rstd, part_dy, N, C, H, W, *x.stride(), *dy.stride(),
        K=weight.shape[2], ACT=act, AFFINE=affine, ACC=tl_acc(x.dtype))
    sum_rows(part_dy[0], dbeta)
    sum_rows(part_dy[1], dgamma)


def _check_grad_output(op, dy, x):
    if dy.shape != x.shape or dy.dtype != x.dtype:
        raise RuntimeError(f"{op}: grad_output {dy.dtype} {tuple(dy.shape)} does not match x "
                           f"{x.dtype} {tuple(x.shape)}")
    return dy.contiguous(memory_format=memory_format_of(x))


def dw_block_backward_reduce(dy, x, in_scale, in_shift, weight, bias, mean, rstd, act: int):
    """Synchronized BN, backward pass 1: (2, C) local sums [sum dy, sum dy*ghat]."""
    _check("dw_block_backward_reduce", x, in_scale, in_shift, weight, bias, mean, mean, mean, rstd, False)
    dy = _check_grad_output("dw_block_backward_reduce", dy, x)
    affine = in_scale.numel() > 0
    if not affine:
        in_scale = in_shift = mean
    C = x.shape[1]
    sums = new_output(torch.empty((2, C), dtype=mean.dtype, device=x.device))
    part_dy = new_output(torch.empty((2, _splits(x, C), C), dtype=acc_dtype(x.dtype), device=x.device))
    _backward_reduce(dy, x, in_scale, in_shift, weight.contiguous(), bias, mean, rstd, affine, act, part_dy,
                     sums[0], sums[1])
    return sums


def dw_block_backward(dy, x, in_scale, in_shift, weight, bias, gamma, mean, rstd, batch_stats: bool, dy_means,
                      act: int):
    """Returns [dx, dweight, dbias, dgamma, dbeta, din_scale, din_shift] (dweight/dbias in the weight
    dtype, the rest in gamma's; the last two empty without an input affine). The dt scratch between
    the dt and dx passes is kept in the accumulation dtype. dy_means (2, C), for a synchronized BN:
    the global means of dy and dy*ghat; pass 1 is skipped and dgamma/dbeta come back empty."""
    _check("dw_block_backward", x, in_scale, in_shift, weight, bias, gamma, gamma, mean, rstd, False)
    dy = _check_grad_output("dw_block_backward", dy, x)
    N, C, H, W = x.shape
    K = weight.shape[2]
    weight = weight.contiguous()
    acc = acc_dtype(x.dtype)
    ACC = tl_acc(x.dtype)
    affine = in_scale.numel() > 0
    sums_given = dy_means.numel() > 0
    if sums_given and (not batch_stats or tuple(dy_means.shape) != (2, C) or dy_means.dtype != gamma.dtype):
        raise RuntimeError(f"dw_block_backward: dy_means must be a ({2}, {C}) {gamma.dtype} tensor with batch "
                           f"statistics, got {dy_means.dtype} {tuple(dy_means.shape)}")
    dscale = new_output(torch.empty_like(in_scale))
    dshift = new_output(torch.empty_like(in_shift))
    if not affine:
        in_scale = in_shift = gamma  # never read (AFFINE=False)
    dx = new_output(torch.empty_like(x))
    dweight = new_output(torch.empty_like(weight, memory_format=torch.contiguous_format))
    dbias = new_output(torch.empty_like(bias))
    dt = new_output(torch.empty_like(x, dtype=acc))
    S = _splits(x, C)
    geom = (N, C, H, W) + tuple(x.stride())
    part_dy = new_output(torch.empty((2, S, C), dtype=acc, device=x.device))
    if sums_given:  # c1, c2 are the given means: dt kernel with M = 1
        c1_src, c2_src, count = dy_means[0], dy_means[1], 1
        dgamma = dbeta = gamma.new_empty(0)
    else:
        dgamma = new_output(torch.empty_like(gamma))
        dbeta = new_output(torch.empty_like(gamma))
        c1_src, c2_src, count = dbeta, dgamma, N * H * W
        if batch_stats:
            _backward_reduce(dy, x, in_scale, in_shift, weight, bias, mean, rstd, affine, act, part_dy, dbeta,
                             dgamma)
    part_dw = new_output(torch.empty((S, C, K * K), dtype=acc, device=x.device))
    part_db = new_output(torch.empty((S, C), dtype=acc, device=x.device))
    _dw_backward_dt_kernel[lambda m: (S, triton.cdiv(C, m["BLOCK_C"]))](
        dy, x, in_scale, in_shift, weight, bias, gamma, mean, rstd, c1_src, c2_src, dt, part_dw, part_db, part_dy,
        count, *geom, *dy.stride(), *dt.stride(), K=K, ACT=act, AFFINE=affine, ACC=ACC, TRAINING=batch_stats,
        KK_PAD=triton.next_power_of_2(K * K))
    if not batch_stats:
        sum_rows(part_dy[0], dbeta)   # dbeta = sum dy
        sum_rows(part_dy[1], dgamma)  # dgamma = sum dy*ghat
    part_aff = new_output(torch.empty((2, S, C), dtype=acc, device=x.device)) if affine else dt
    _dw_backward_dx_kernel[lambda m: (S, triton.cdiv(C, m["BLOCK_C"]))](
        dy, dt, weight, x, in_scale, dx, part_aff, N, C, H, W, *dy.stride(), *dt.stride(), *dx.stride(), K=K,
        AFFINE=affine, ACC=ACC)
    sum_rows(part_dw, dweight)
    sum_rows(part_db, dbias)
    if affine:
        sum_rows(part_aff[0], dscale)  # d in_scale = sum du*x
        sum_rows(part_aff[1], dshift)  # d in_shift = sum du
    return [dx, dweight, dbias, dgamma, dbeta, dscale, dshift]
