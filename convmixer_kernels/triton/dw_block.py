"""Fused depthwise block in Triton:  y = u + gamma * (act(dwconv_k(u) + b) - mean) * rstd + beta,
with u = x, or u = in_scale[c]*(x - in_center[c]) + in_shift[c] when the previous pointwise block's BN apply is folded
into this block's loads (AFFINE; zero padding is of u, so out-of-image taps stay 0).

Tiling: a program (or one loop iteration of a reduction program) owns a "tile" = a BLOCK_H x BLOCK_W
block of pixels of one image n x BLOCK_C channels, held as a [BLOCK_H*BLOCK_W, BLOCK_C] tensor (pixel
p -> row h0 + p // BLOCK_W, column w0 + p % BLOCK_W; power-of-two shifts). All addressing goes through
the tensors' strides, so NCHW and channels_last share the kernels; in channels_last (the GPU fast path)
the channel axis has stride 1 and Triton's stride-1 specialization vectorizes the loads along it (in
NCHW the column stride is 1). The k x k halo of a tile is read through the L1 cache: each tap is a
shifted, masked load of the tile. Offsets: the image base n * stride_n is one int64 scalar per tile;
everything inside an image is int32 (the launchers check C*H*W < 2^31), computed once per tile, and a
tap only adds the scalar shift (i-pl)*stride_h + (j-pl)*stride_w.

Why the previous version spilled (sm_90 bf16 k=9, 64 pixels x 64 channels, 8 warps: 32 registers and a
7,320-byte stack; the dt kernel 255 registers + stack): both tap loops were `tl.static_range`, so k*k = 81
shifted [64, 64] tile loads, 81 per-tap weight loads, 81 sets of masks and 64-bit pointer tensors were
unrolled into one basic block (821 ld.global, ~4,900 virtual registers in the PTX); the schedulers hoist
the independent loads, ptxas cannot keep them live and spills. The backward dt kernel also kept the dw
partials as a [KK_PAD, BLOCK_C] register tensor updated with a where() over all KK_PAD rows per tap.
The weights were also read per tap as w[c*k*k + tap]: k*k apart across the channels, one scalar load
per channel per tap (8 per thread per tap in bf16), all hoisted and live.
Now: the stencil-row loop (i) is a real loop (scf.for, not unrolled) and only the k taps of one row are
unrolled, so at most k tile loads are in flight (the dt kernel, with more live state, runs one tap at a
time); the launchers pass the weights tap-major, (k*k, C), so a tap's weights are one stride-1 vector
load; each program's dw partials live in its own [k*k, C] block of the [splits, k*k, C] partial buffer
(zeroed by the program, read-modify-written per tap in program order, a barrier per tile orders the
threads: deterministic, no atomics), so nothing k*k-sized is in registers. Each config holds 8 tile
elements per thread (see _CONFIGS). Result (AOT, k = 7/9): sm_90 bf16 channels_last apply kernel 64-100
registers, 0 stack; every depthwise kernel, config, dtype, layout and target at most 32 bytes of stack:
the few nonzero frames (8-32 B) sit exactly at ptxas's occupancy breakpoints (64/72/80/96/128 registers),
where ptxas itself trades a register or two of spill for one more resident CTA per SM.

Passes:
  eval forward     : _dw_forward_apply_kernel (conv + bias + act + BN affine + residual), one pass.
  training forward : _dw_forward_stats_kernel (per-program Chan/Welford partials of g = act(t)),
                     common._bn_stats_finalize_kernel (merge -> mean/var/rstd), then the apply kernel.
  backward         : [training] _dw_backward_reduce_kernel (partial sum(dy), sum(dy*ghat), sum(ghat), t
                     recomputed)
                     -> sums; _dw_backward_dt_kernel (dt into an fp32 scratch, partial dw/db, and in eval
                     also the dy sums); _dw_backward_dx_kernel (du = dy + conv_transpose(dt); dx = du,
                     or in_scale*du with partial sums of du*(x - in_center) and du for the input affine's gradients);
                     common._sum_rows_kernel reduces every partial buffer in a fixed order.
Reductions run on a (splits x channel blocks) grid; each program loops over a contiguous range of
tiles, so partial buffers are [splits, C] regardless of the tile size (which autotuning may change).

fp64 inputs are computed in fp64 (ACC = tl.float64); fp32/fp16/bf16 accumulate in fp32.
Batch statistics over at most _C.exact_training_max_count() values per channel are computed in fp64
too, rounded once at the end (common.use_exact_training: the CPU backend's rule).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import (INTERPRET, act_backward, act_forward, acc_dtype, check_activation, check_per_channel, f64,
                     finalize_stats, memory_format_of, new_output, num_programs_hint, sum_rows, tile_moments, tl_acc,
                     use_exact_training, welford_merge)


def _cfg(bh, bw, bc, warps):
    return triton.Config({"BLOCK_H": bh, "BLOCK_W": bw, "BLOCK_C": bc}, num_warps=warps, num_stages=1)


if INTERPRET:
    _CONFIGS = [_cfg(4, 8, 16, 1)]
else:
    # Hopper/Ampere: memory/L1-bound stencils, no tensor cores. Every config holds
    # BLOCK_H*BLOCK_W*BLOCK_C / (32*warps) = 8 tile elements per thread, which with the k loads of one stencil
    # row in flight (apply/stats/reduce/dx) or one tap at a time (dt) compiles to <= 170 registers and <= 32
    # bytes of stack (0 for the apply kernel at sm_90 bf16 channels_last) at k <= 9 for sm_90/sm_80,
    # fp32/fp16/bf16, both layouts (swept; tests/test_triton_aot.py asserts the bound). Configs with 16
    # elements per thread were dropped: ptxas caps them at 128 registers (its occupancy heuristic) and
    # spills 16-48 bytes. num_stages=1: no tl.dot, nothing for the software pipeliner to stage (the halo
    # loads are L1 hits); staging them through shared memory would only cost registers and smem.
    _CONFIGS = [
        # (4, 8, 32, 4 warps) was dropped too: at k=7 bf16 channels_last it lands on ptxas's 72-register
        # breakpoint with an 8-byte stack; small-C channels_last problems use 8x8x32 below instead.
        _cfg(4, 8, 64, 8),    # channels_last default: 32 px x 64 ch (bf16: 128 B per pixel = one line)
        _cfg(8, 8, 32, 8),    # squarer 2D tile, less halo re-read ((8+k-1)^2 / 64 px); C = 32..64
        _cfg(2, 8, 128, 8),   # wide channel blocks for C >= 128 (ConvMixer 256..1536): 256 B per pixel
        _cfg(4, 16, 16, 4),   # NCHW, W <= 16: 16 stride-1 columns x 4 rows x 16 channels
        _cfg(4, 32, 16, 8),   # NCHW, W >= 32 (ConvMixer 32x32): 32 stride-1 columns (128 B fp32 rows)
    ]
_KEY = ["N", "C", "H", "W", "K"]


def _prune_configs(configs, nargs, **kwargs):
    """prune_configs_by: drop configs whose tile is far larger than the problem (channel block beyond
    next_pow2(C), tile width/height beyond next_pow2(W/H)), and in NCHW (unit column stride) those
    with fewer than 16 stride-1 columns, in channels_last those with fewer than 32 stride-1 channels,
    unless nothing else fits. Never returns an empty list (falls back to the smallest tile)."""
    args = dict(nargs, **kwargs)
    C, H, W = args["C"], args["H"], args["W"]
    nchw = args.get("sxw") == 1 and args.get("sxc") != 1
    fit = [c for c in configs if c.kwargs["BLOCK_C"] <= max(16, triton.next_power_of_2(C))
           and c.kwargs["BLOCK_W"] <= max(8, triton.next_power_of_2(W))
           and c.kwargs["BLOCK_H"] <= max(4, triton.next_power_of_2(H))]
    if nchw:
        pref = [c for c in fit if c.kwargs["BLOCK_W"] >= min(16, triton.next_power_of_2(W))]
    else:
        pref = [c for c in fit if c.kwargs["BLOCK_C"] >= min(32, triton.next_power_of_2(C))]
    keep = pref or fit
    if not keep:
        keep = [min(configs, key=lambda c: c.kwargs["BLOCK_H"] * c.kwargs["BLOCK_W"] * c.kwargs["BLOCK_C"])]
    return keep


_PRUNE = {"early_config_prune": _prune_configs}


# --- device helpers ---------------------------------------------------------------------------------

@triton.jit
def _tile_coords(tile, H, W, C, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr, pid_c):
    # tile -> (image n (int64), rows h, cols w of the BLOCK_H x BLOCK_W pixel block (int32, flattened to
    # BLOCK_H*BLOCK_W), channel offsets c, pixel mask, channel mask)
    tiles_w = tl.cdiv(W, BLOCK_W)
    tiles_img = tl.cdiv(H, BLOCK_H) * tiles_w
    n = tile // tiles_img
    r = tile % tiles_img
    p = tl.arange(0, BLOCK_H * BLOCK_W)
    h = (r // tiles_w) * BLOCK_H + p // BLOCK_W
    w = (r % tiles_w) * BLOCK_W + p % BLOCK_W
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    return n.to(tl.int64), h, w, c, (h < H) & (w < W), c < C


@triton.jit
def _split_tiles(N, H, W, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    # Reduction programs (grid: splits x channel blocks): program s owns the contiguous tile range
    # [start, end) of the N * cdiv(H, BLOCK_H) * cdiv(W, BLOCK_W) pixel tiles -> (s, splits, start, end)
    pid_s = tl.program_id(0)
    splits = tl.num_programs(0)
    total = N * tl.cdiv(H, BLOCK_H) * tl.cdiv(W, BLOCK_W)
    per = tl.cdiv(total, splits)
    start = pid_s * per
    return pid_s, splits, start, tl.minimum(start + per, total)


@triton.jit
def _input_affine(center_ptr, scale_ptr, shift_ptr, c, c_ok, AFFINE: tl.constexpr, ACC: tl.constexpr):
    # per-channel (center, scale, shift) of u = scale*(x - center) + shift; (0, 1, 0) without an input affine
    if AFFINE:
        return (tl.load(center_ptr + c, mask=c_ok, other=0.0).to(ACC),
                tl.load(scale_ptr + c, mask=c_ok, other=0.0).to(ACC),
                tl.load(shift_ptr + c, mask=c_ok, other=0.0).to(ACC))
    else:
        return tl.zeros(c.shape, ACC), tl.full(c.shape, 1.0, ACC), tl.zeros(c.shape, ACC)


@triton.jit
def _load_u(ptrs, mask, center, scale, shift, AFFINE: tl.constexpr, ACC: tl.constexpr):
    # u = scale*(x - center) + shift on in-bounds elements, 0 elsewhere (the zero padding is of u). The
    # centre comes off first, as in BatchNorm: folded into the shift it cancels when |mean| >> std.
    xv = tl.load(ptrs, mask=mask, other=0.0).to(ACC)
    if AFFINE:
        xv = tl.where(mask, (xv - center[None, :]) * scale[None, :] + shift[None, :], 0.0)
    return xv


@triton.jit
def _offsets(h, w, c, sc, sh, sw):
    # int32 offsets of the tile's elements within one image: [pixels, channels]
    return (h * sh + w * sw)[:, None] + (c * sc)[None, :]


@triton.jit
def _dw_conv_tile(x_img, center, scale, shift, w_ptr, b_ptr, h, w, c, p_ok, c_ok, C, H, W, sxc, sxh, sxw,
                  K: tl.constexpr, AFFINE: tl.constexpr, ACC: tl.constexpr, ROW_UNROLL: tl.constexpr):
    # t[p, c] = b[c] + sum_{i,j} w[c,0,i,j] * u[n, c, h+i-pl, w+j-pl]   (zero padding of u, pl = (k-1)//2)
    # ROW_UNROLL: i is a runtime loop and the k taps of one stencil row are unrolled (k loads in flight);
    # else one runtime loop over the k*k taps (one load in flight: for kernels with more live state).
    # x_img = x + n*stride_n; w_ptr: tap-major weights, w[c, 0, i, j] at (i*k + j)*C + c.
    PL: tl.constexpr = (K - 1) // 2
    off = _offsets(h, w, c, sxc, sxh, sxw)
    acc = tl.zeros(off.shape, dtype=ACC) + tl.load(b_ptr + c, mask=c_ok, other=0.0).to(ACC)[None, :]
    w_c = w_ptr + c
    if ROW_UNROLL:
        for i in range(K):
            hi = h + (i - PL)
            row_ok = p_ok & (hi >= 0) & (hi < H)
            row = x_img + (off + (i - PL) * sxh)
            for j in tl.static_range(K):
                wj = w + (j - PL)
                ok = (row_ok & (wj >= 0) & (wj < W))[:, None] & c_ok[None, :]
                xv = _load_u(row + (j - PL) * sxw, ok, center, scale, shift, AFFINE, ACC)
                wv = tl.load(w_c + (i * K + j) * C, mask=c_ok, other=0.0).to(ACC)
                acc += xv * wv[None, :]
    else:
        for tap in range(K * K):
            di = tap // K - PL
            dj = tap % K - PL
            hi = h + di
            wj = w + dj
            ok = (p_ok & (hi >= 0) & (hi < H) & (wj >= 0) & (wj < W))[:, None] & c_ok[None, :]
            xv = _load_u(x_img + (off + (di * sxh + dj * sxw)), ok, center, scale, shift, AFFINE, ACC)
            wv = tl.load(w_c + tap * C, mask=c_ok, other=0.0).to(ACC)
            acc += xv * wv[None, :]
    return acc


# --- forward ----------------------------------------------------------------------------------------

@triton.autotune(configs=_CONFIGS, key=_KEY, prune_configs_by=_PRUNE)
@triton.jit
def _dw_forward_apply_kernel(x_ptr, in_center_ptr, in_scale_ptr, in_shift_ptr, w_ptr, b_ptr, gamma_ptr, beta_ptr,
                             mean_ptr, rstd_ptr, y_ptr, N, C, H, W, sxn, sxc, sxh, sxw, syn, syc, syh, syw,
                             K: tl.constexpr, ACT: tl.constexpr, AFFINE: tl.constexpr, ACC: tl.constexpr,
                             BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr):
    # y = u + A[c]*act(t) + B[c],  A = gamma*rstd, B = beta - mean*A,  t = b + dwconv_k(u)
    # (eval, and training's apply pass); grid: (N * tiles per image, channel blocks)
    n, h, w, c, p_ok, c_ok = _tile_coords(tl.program_id(0), H, W, C, BLOCK_H, BLOCK_W, BLOCK_C, tl.program_id(1))
    ice, isc, ish = _input_affine(in_center_ptr, in_scale_ptr, in_shift_ptr, c, c_ok, AFFINE, ACC)
    x_img = x_ptr + n * sxn
    t = _dw_conv_tile(x_img, ice, isc, ish, w_ptr, b_ptr, h, w, c, p_ok, c_ok, C, H, W, sxc, sxh, sxw, K, AFFINE, ACC,
                      True)
    g = act_forward(t, ACT)
    scale = tl.load(gamma_ptr + c, mask=c_ok, other=0.0).to(ACC) * tl.load(rstd_ptr + c, mask=c_ok, other=0.0).to(ACC)
    shift = tl.load(beta_ptr + c, mask=c_ok, other=0.0).to(ACC) - tl.load(mean_ptr + c, mask=c_ok, other=0.0).to(ACC) * scale
    ok = p_ok[:, None] & c_ok[None, :]
    xv = _load_u(x_img + _offsets(h, w, c, sxc, sxh, sxw), ok, ice, isc, ish, AFFINE, ACC)
    y = xv + g * scale[None, :] + shift[None, :]
    tl.store(y_ptr + n * syn + _offsets(h, w, c, syc, syh, syw), y.to(y_ptr.dtype.element_ty), mask=ok)


@triton.autotune(configs=_CONFIGS, key=_KEY, prune_configs_by=_PRUNE)
@triton.jit
def _dw_forward_stats_kernel(x_ptr, in_center_ptr, in_scale_ptr, in_shift_ptr, w_ptr, b_ptr, part_ptr, N, C, H, W,
                             sxn, sxc, sxh, sxw, K: tl.constexpr, ACT: tl.constexpr, AFFINE: tl.constexpr,
                             ACC: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
                             BLOCK_C: tl.constexpr):
    # part[:, s, c] = (count, mean, M2) of g = act(t), t = b + dwconv_k(u), over this program's tiles:
    # per tile exact moments, merged tile by tile with Chan's rule (never E[g^2] - E[g]^2).
    pid_s, splits, start, end = _split_tiles(N, H, W, BLOCK_H, BLOCK_W)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    ice, isc, ish = _input_affine(in_center_ptr, in_scale_ptr, in_shift_ptr, c, c < C, AFFINE, ACC)
    n_acc = tl.zeros([BLOCK_C], dtype=ACC)
    mean_acc = tl.zeros([BLOCK_C], dtype=ACC)
    m2_acc = tl.zeros([BLOCK_C], dtype=ACC)
    for tile in range(start, end):
        n, h, w, c, p_ok, c_ok = _tile_coords(tile, H, W, C, BLOCK_H, BLOCK_W, BLOCK_C, tl.program_id(1))
        t = _dw_conv_tile(x_ptr + n * sxn, ice, isc, ish, w_ptr, b_ptr, h, w, c, p_ok, c_ok, C, H, W, sxc, sxh, sxw, K,
                          AFFINE, ACC, True)
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
def _ghat_tile(x_img, ice, isc, ish, w_ptr, b_ptr, mean_ptr, rstd_ptr, h, w, c, p_ok, c_ok, C, H, W, sxc, sxh, sxw,
               K: tl.constexpr, ACT: tl.constexpr, AFFINE: tl.constexpr, ACC: tl.constexpr,
               ROW_UNROLL: tl.constexpr):
    # (t, ghat = (act(t) - mean) * rstd) with t = b + dwconv_k(u) recomputed
    t = _dw_conv_tile(x_img, ice, isc, ish, w_ptr, b_ptr, h, w, c, p_ok, c_ok, C, H, W, sxc, sxh, sxw, K, AFFINE, ACC,
                      ROW_UNROLL)
    mu = tl.load(mean_ptr + c, mask=c_ok, other=0.0).to(ACC)
    rs = tl.load(rstd_ptr + c, mask=c_ok, other=0.0).to(ACC)
    return t, (act_forward(t, ACT) - mu[None, :]) * rs[None, :]


@triton.autotune(configs=_CONFIGS, key=_KEY, prune_configs_by=_PRUNE)
@triton.jit
def _dw_backward_reduce_kernel(dy_ptr, x_ptr, in_center_ptr, in_scale_ptr, in_shift_ptr, w_ptr, b_ptr, mean_ptr,
                               rstd_ptr, part_ptr, N, C, H, W, sxn, sxc, sxh, sxw, sdn, sdc, sdh, sdw,
                               K: tl.constexpr, ACT: tl.constexpr, AFFINE: tl.constexpr, ACC: tl.constexpr,
                               BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr):
    # part[0, s, c] = sum dy,  part[1, s, c] = sum dy*ghat,  part[2, s, c] = sum ghat  over this program's
    # tiles (ghat = (act(t) - mean)*rstd, t = b + dwconv_k(u) recomputed; sum ghat measures how far the
    # saved, rounded mean is from the exact mean of g: see dw_block_backward)
    pid_s, splits, start, end = _split_tiles(N, H, W, BLOCK_H, BLOCK_W)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    ice, isc, ish = _input_affine(in_center_ptr, in_scale_ptr, in_shift_ptr, c, c < C, AFFINE, ACC)
    sum_dy = tl.zeros([BLOCK_C], dtype=ACC)
    sum_dyg = tl.zeros([BLOCK_C], dtype=ACC)
    sum_ghat = tl.zeros([BLOCK_C], dtype=ACC)
    for tile in range(start, end):
        n, h, w, c, p_ok, c_ok = _tile_coords(tile, H, W, C, BLOCK_H, BLOCK_W, BLOCK_C, tl.program_id(1))
        t, ghat = _ghat_tile(x_ptr + n * sxn, ice, isc, ish, w_ptr, b_ptr, mean_ptr, rstd_ptr, h, w, c, p_ok, c_ok, C,
                             H, W, sxc, sxh, sxw, K, ACT, AFFINE, ACC, True)
        ok = p_ok[:, None] & c_ok[None, :]
        dy = tl.load(dy_ptr + n * sdn + _offsets(h, w, c, sdc, sdh, sdw), mask=ok, other=0.0).to(ACC)
        sum_dy += tl.sum(dy, axis=0)
        sum_dyg += tl.sum(tl.where(ok, dy * ghat, 0.0), axis=0)
        sum_ghat += tl.sum(tl.where(ok, ghat, 0.0), axis=0)
    c_ok = c < C
    plane = splits.to(tl.int64) * C
    offs = pid_s.to(tl.int64) * C + c
    tl.store(part_ptr + offs, sum_dy, mask=c_ok)
    tl.store(part_ptr + plane + offs, sum_dyg, mask=c_ok)
    tl.store(part_ptr + 2 * plane + offs, sum_ghat, mask=c_ok)


@triton.autotune(configs=_CONFIGS, key=_KEY, prune_configs_by=_PRUNE)
@triton.jit
def _dw_backward_dt_kernel(dy_ptr, x_ptr, in_center_ptr, in_scale_ptr, in_shift_ptr, w_ptr, b_ptr, gamma_ptr, mean_ptr,
                           rstd_ptr, dbeta_ptr, dgamma_ptr, dhat_ptr, dt_ptr, part_dw_ptr, part_db_ptr, part_dy_ptr,
                           M, N, C, H, W, sxn, sxc, sxh, sxw, sdn, sdc, sdh, sdw, stn, stc, sth, stw,
                           K: tl.constexpr, ACT: tl.constexpr, AFFINE: tl.constexpr, ACC: tl.constexpr,
                           TRAINING: tl.constexpr, KK_PAD: tl.constexpr,
                           BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr):
    # dt = gamma*rstd*(dy - c1 - ghat*c2) * act'(t)   (training: c1 = dbeta/M = sum(dy)/M,
    #                                                  c2 = dgamma/M = sum(dy*ghat)/M; eval: c1 = c2 = 0)
    # In training ghat = (act(t) - mean)*rstd - dhat, centred on the exact mean of g (dhat: see dw_block_backward).
    # dt is stored (fp32/fp64 scratch, x's layout) for the dx pass; per program partials:
    #   part_dw[s, i*k+j, c] = sum dt[n,c,h,w] * u[n,c,h+i-pl,w+j-pl],  part_db[s, c] = sum dt,
    #   eval only: part_dy[0|1, s, c] = sum dy | sum dy*ghat (dbeta, dgamma; training had its own pass).
    # part_dw[s] is accumulated in place (zeroed first, then read-modify-write per tap, one barrier per
    # tile): program s is its only writer and the order is fixed, so the result is deterministic.
    PL: tl.constexpr = (K - 1) // 2
    pid_s, splits, start, end = _split_tiles(N, H, W, BLOCK_H, BLOCK_W)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    ice, isc, ish = _input_affine(in_center_ptr, in_scale_ptr, in_shift_ptr, c, c_ok, AFFINE, ACC)
    a = tl.load(gamma_ptr + c, mask=c_ok, other=0.0).to(ACC) * tl.load(rstd_ptr + c, mask=c_ok, other=0.0).to(ACC)
    if TRAINING:
        c1 = tl.load(dbeta_ptr + c, mask=c_ok, other=0.0).to(ACC) / M
        c2 = tl.load(dgamma_ptr + c, mask=c_ok, other=0.0).to(ACC) / M
        dhat = tl.load(dhat_ptr + c, mask=c_ok, other=0.0).to(ACC)
    else:
        c1 = tl.zeros([BLOCK_C], dtype=ACC)
        c2 = tl.zeros([BLOCK_C], dtype=ACC)
        dhat = tl.zeros([BLOCK_C], dtype=ACC)
    s64 = pid_s.to(tl.int64)
    dw_c = part_dw_ptr + s64 * (K * K) * C + c  # this program's [k*k, C] (tap-major) partial block
    taps = tl.arange(0, KK_PAD)
    tl.store(dw_c[None, :] + taps[:, None] * C, tl.zeros([KK_PAD, BLOCK_C], dtype=ACC),
             mask=(taps < K * K)[:, None] & c_ok[None, :])
    tl.debug_barrier()
    db_acc = tl.zeros([BLOCK_C], dtype=ACC)
    sum_dy = tl.zeros([BLOCK_C], dtype=ACC)
    sum_dyg = tl.zeros([BLOCK_C], dtype=ACC)
    for tile in range(start, end):
        n, h, w, c, p_ok, c_ok = _tile_coords(tile, H, W, C, BLOCK_H, BLOCK_W, BLOCK_C, tl.program_id(1))
        x_img = x_ptr + n * sxn
        t, ghat = _ghat_tile(x_img, ice, isc, ish, w_ptr, b_ptr, mean_ptr, rstd_ptr, h, w, c, p_ok, c_ok, C, H, W,
                             sxc, sxh, sxw, K, ACT, AFFINE, ACC, False)
        ghat = ghat - dhat[None, :]
        ok = p_ok[:, None] & c_ok[None, :]
        dy = tl.load(dy_ptr + n * sdn + _offsets(h, w, c, sdc, sdh, sdw), mask=ok, other=0.0).to(ACC)
        dt = a[None, :] * (dy - c1[None, :] - ghat * c2[None, :]) * act_backward(t, ACT)
        dt = tl.where(ok, dt, 0.0)
        tl.store(dt_ptr + n * stn + _offsets(h, w, c, stc, sth, stw), dt, mask=ok)
        db_acc += tl.sum(dt, axis=0)
        if not TRAINING:
            sum_dy += tl.sum(dy, axis=0)
            sum_dyg += tl.sum(tl.where(ok, dy * ghat, 0.0), axis=0)
        off = _offsets(h, w, c, sxc, sxh, sxw)
        for tap in range(K * K):  # runtime loop, one tap at a time: each tap ends in a cross-warp sum
            di = tap // K - PL
            dj = tap % K - PL
            hi = h + di
            wj = w + dj
            m = (p_ok & (hi >= 0) & (hi < H) & (wj >= 0) & (wj < W))[:, None] & c_ok[None, :]
            xv = _load_u(x_img + (off + (di * sxh + dj * sxw)), m, ice, isc, ish, AFFINE, ACC)
            contrib = tl.sum(dt * xv, axis=0)
            prev = tl.load(dw_c + tap * C, mask=c_ok, other=0.0)
            tl.store(dw_c + tap * C, prev + contrib, mask=c_ok)
        tl.debug_barrier()  # this tile's part_dw stores before the next tile's loads (other threads)
    c_ok = c < C
    tl.store(part_db_ptr + s64 * C + c, db_acc, mask=c_ok)
    if not TRAINING:
        tl.store(part_dy_ptr + s64 * C + c, sum_dy, mask=c_ok)
        tl.store(part_dy_ptr + splits.to(tl.int64) * C + s64 * C + c, sum_dyg, mask=c_ok)


@triton.autotune(configs=_CONFIGS, key=_KEY, prune_configs_by=_PRUNE)
@triton.jit
def _dw_backward_dx_kernel(dy_ptr, dt_ptr, w_ptr, x_ptr, in_center_ptr, in_scale_ptr, dx_ptr, part_ptr, N, C, H, W,
                           sdn, sdc, sdh, sdw, stn, stc, sth, stw, sxn, sxc, sxh, sxw,
                           K: tl.constexpr, AFFINE: tl.constexpr, ACC: tl.constexpr,
                           BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr):
    # du[n,c,h,w] = dy[n,c,h,w] + sum_{i,j} w[c,0,i,j] * dt[n,c,h-i+pl,w-j+pl]   (residual + conv_transpose)
    # dx = du, or with the input affine u = scale*(x - center) + shift: dx = scale*du and per program
    #   partials part[0, s, c] = sum du*(x - center) (d scale, centred here: no cancelling difference of
    #   two large sums later),  part[1, s, c] = sum du (d shift)
    PL: tl.constexpr = (K - 1) // 2
    pid_s, splits, start, end = _split_tiles(N, H, W, BLOCK_H, BLOCK_W)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    ice, isc, _unused = _input_affine(in_center_ptr, in_scale_ptr, in_scale_ptr, c, c < C, AFFINE, ACC)
    sum_dux = tl.zeros([BLOCK_C], dtype=ACC)
    sum_du = tl.zeros([BLOCK_C], dtype=ACC)
    for tile in range(start, end):
        n, h, w, c, p_ok, c_ok = _tile_coords(tile, H, W, C, BLOCK_H, BLOCK_W, BLOCK_C, tl.program_id(1))
        ok = p_ok[:, None] & c_ok[None, :]
        acc = tl.load(dy_ptr + n * sdn + _offsets(h, w, c, sdc, sdh, sdw), mask=ok, other=0.0).to(ACC)
        off = _offsets(h, w, c, stc, sth, stw)
        dt_img = dt_ptr + n * stn
        w_c = w_ptr + c  # tap-major weights
        for i in range(K):  # runtime loop: k taps of one stencil row live at a time
            hi = h - (i - PL)
            row_ok = p_ok & (hi >= 0) & (hi < H)
            row = dt_img + (off - (i - PL) * sth)
            for j in tl.static_range(K):
                wj = w - (j - PL)
                m = (row_ok & (wj >= 0) & (wj < W))[:, None] & c_ok[None, :]
                dtv = tl.load(row - (j - PL) * stw, mask=m, other=0.0)
                wv = tl.load(w_c + (i * K + j) * C, mask=c_ok, other=0.0).to(ACC)
                acc += dtv.to(ACC) * wv[None, :]
        x_offs = _offsets(h, w, c, sxc, sxh, sxw)
        if AFFINE:
            xv = tl.load(x_ptr + n * sxn + x_offs, mask=ok, other=0.0).to(ACC)
            sum_dux += tl.sum(tl.where(ok, acc * (xv - ice[None, :]), 0.0), axis=0)
            sum_du += tl.sum(tl.where(ok, acc, 0.0), axis=0)
            acc = acc * isc[None, :]
        tl.store(dx_ptr + n * sxn + x_offs, acc.to(dx_ptr.dtype.element_ty), mask=ok)
    if AFFINE:
        c_ok = c < C
        offs = pid_s.to(tl.int64) * C + c
        tl.store(part_ptr + offs, sum_dux, mask=c_ok)
        tl.store(part_ptr + splits.to(tl.int64) * C + offs, sum_du, mask=c_ok)


# --- launchers --------------------------------------------------------------------------------------

def _check(op, x, in_center, in_scale, in_shift, weight, bias, gamma, beta, mean, rstd, batch_stats):
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
    if not in_scale.numel() == in_shift.numel() == in_center.numel():
        raise RuntimeError(f"{op}: in_center, in_scale and in_shift must all be empty or all have {C} elements, "
                           f"got {tuple(in_center.shape)}, {tuple(in_scale.shape)} and {tuple(in_shift.shape)}")
    if in_scale.numel():
        check_per_channel(op, "in_center", in_center, C, acc, x.device)
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


def _k_of(weight_taps: torch.Tensor) -> int:
    return int(round(weight_taps.shape[0] ** 0.5))


def _tap_major(weight: torch.Tensor) -> torch.Tensor:
    # (C, 1, k, k) -> (k*k, C) contiguous: a tap's weights of a channel block are one stride-1 vector load
    # (in the (C, k*k) layout they are k*k apart: one scalar load per channel per tap).
    return weight.reshape(weight.shape[0], -1).t().contiguous()


def _forward_stats(x, in_center, in_scale, in_shift, weight, bias, affine, eps, act):
    """Training pass 1: (mean, rstd, var) of g = act(dwconv(u) + b) over the batch (biased var).
    weight: the (k*k, C) tap-major copy (_tap_major)."""
    N, C, H, W = x.shape
    S = _splits(x, C)
    acc = acc_dtype(x.dtype)
    parts = new_output(torch.empty((3, S, C), dtype=acc, device=x.device))
    _dw_forward_stats_kernel[lambda m: (S, triton.cdiv(C, m["BLOCK_C"]))](
        x, in_center, in_scale, in_shift, weight, bias, parts, N, C, H, W, *x.stride(), K=_k_of(weight), ACT=act,
        AFFINE=affine, ACC=tl_acc(x.dtype))
    mean = new_output(torch.empty(C, dtype=acc, device=x.device))
    rstd = new_output(torch.empty_like(mean))
    var = new_output(torch.empty_like(mean))
    finalize_stats(parts, eps, mean, var, rstd)
    return mean, rstd, var


def dw_block_forward(x, in_center, in_scale, in_shift, weight, bias, gamma, beta, mean, rstd, batch_stats: bool,
                     eps: float, act: int):
    """Returns [y, mean, rstd, var]: the batch statistics (biased var) when batch_stats, else empty.
    The block's input is u = in_scale*(x - in_center) + in_shift per channel, or x when all are empty."""
    _check("dw_block_forward", x, in_center, in_scale, in_shift, weight, bias, gamma, beta, mean, rstd, batch_stats)
    N, C, H, W = x.shape
    if use_exact_training(x.dtype, batch_stats, N * H * W):
        o = dw_block_forward(*f64(x, in_center, in_scale, in_shift, weight, bias, gamma, beta, mean, rstd), batch_stats,
                             eps, act)
        return [o[0].to(x.dtype)] + [v.to(gamma.dtype) for v in o[1:]]
    K = weight.shape[2]
    weight = _tap_major(weight)
    affine = in_scale.numel() > 0
    if not affine:
        in_center = in_scale = in_shift = gamma  # never read (AFFINE=False)
    y = new_output(torch.empty_like(x))
    empty = torch.empty(0, dtype=gamma.dtype, device=x.device)
    if batch_stats:
        mean, rstd, var = _forward_stats(x, in_center, in_scale, in_shift, weight, bias, affine, eps, act)
    _dw_forward_apply_kernel[lambda m: (N * triton.cdiv(H, m["BLOCK_H"]) * triton.cdiv(W, m["BLOCK_W"]),
                                         triton.cdiv(C, m["BLOCK_C"]))](
        x, in_center, in_scale, in_shift, weight, bias, gamma, beta, mean, rstd, y, N, C, H, W, *x.stride(),
        *y.stride(), K=K, ACT=act, AFFINE=affine, ACC=tl_acc(x.dtype))
    if not batch_stats:
        return [y, empty, empty, empty.clone()]
    return [y, mean, rstd, var]


def dw_block_batch_stats(x, in_center, in_scale, in_shift, weight, bias, act: int):
    """Synchronized BN, forward pass 1: [mean, var] (biased) of g over this call's batch; no output."""
    unused = torch.zeros(x.shape[1], dtype=acc_dtype(x.dtype), device=x.device)
    _check("dw_block_batch_stats", x, in_center, in_scale, in_shift, weight, bias, unused, unused, unused, unused, True)
    affine = in_scale.numel() > 0
    if not affine:
        in_center = in_scale = in_shift = unused
    mean, _, var = _forward_stats(x, in_center, in_scale, in_shift, _tap_major(weight), bias, affine, 1.0,
                                  act)  # rstd unused
    return [mean, var]


def _backward_reduce(dy, x, in_center, in_scale, in_shift, weight, bias, mean, rstd, affine, act, part_dy, dbeta,
                     dgamma, sum_ghat=None):
    """Backward pass 1: dbeta = sum dy, dgamma = sum dy*ghat, and sum ghat when asked (per-program partials
    in part_dy, (3, S, C))."""
    N, C, H, W = x.shape
    S = part_dy.shape[1]
    _dw_backward_reduce_kernel[lambda m: (S, triton.cdiv(C, m["BLOCK_C"]))](
        dy, x, in_center, in_scale, in_shift, weight, bias, mean, rstd, part_dy, N, C, H, W, *x.stride(), *dy.stride(),
        K=_k_of(weight), ACT=act, AFFINE=affine, ACC=tl_acc(x.dtype))
    sum_rows(part_dy[0], dbeta)
    sum_rows(part_dy[1], dgamma)
    if sum_ghat is not None:
        sum_rows(part_dy[2], sum_ghat)


def _check_grad_output(op, dy, x):
    if dy.shape != x.shape or dy.dtype != x.dtype:
        raise RuntimeError(f"{op}: grad_output {dy.dtype} {tuple(dy.shape)} does not match x "
                           f"{x.dtype} {tuple(x.shape)}")
    return dy.contiguous(memory_format=memory_format_of(x))


def dw_block_backward_reduce(dy, x, in_center, in_scale, in_shift, weight, bias, mean, rstd, act: int):
    """Synchronized BN, backward pass 1: (3, C) local sums [sum dy, sum dy*ghat, sum ghat]."""
    _check("dw_block_backward_reduce", x, in_center, in_scale, in_shift, weight, bias, mean, mean, mean, rstd, False)
    dy = _check_grad_output("dw_block_backward_reduce", dy, x)
    affine = in_scale.numel() > 0
    if not affine:
        in_center = in_scale = in_shift = mean
    C = x.shape[1]
    sums = new_output(torch.empty((3, C), dtype=mean.dtype, device=x.device))
    part_dy = new_output(torch.empty((3, _splits(x, C), C), dtype=acc_dtype(x.dtype), device=x.device))
    _backward_reduce(dy, x, in_center, in_scale, in_shift, _tap_major(weight), bias, mean, rstd, affine, act, part_dy,
                     sums[0], sums[1], sums[2])
    return sums


def dw_block_backward(dy, x, in_center, in_scale, in_shift, weight, bias, gamma, mean, rstd, batch_stats: bool,
                      dy_means, act: int):
    """Returns [dx, dweight, dbias, dgamma, dbeta, din_scale, din_shift] (dweight/dbias in the weight
    dtype, the rest in gamma's; the last two empty without an input affine). The dt scratch between
    the dt and dx passes is kept in the accumulation dtype. dy_means (3, C), for a synchronized BN:
    the global means of dy and dy*(ghat - dhat), and dhat; pass 1 is skipped and dgamma/dbeta come back empty."""
    _check("dw_block_backward", x, in_center, in_scale, in_shift, weight, bias, gamma, gamma, mean, rstd, False)
    dy = _check_grad_output("dw_block_backward", dy, x)
    N, C, H, W = x.shape
    if dy_means.numel() == 0 and use_exact_training(x.dtype, batch_stats, N * H * W):
        o = dw_block_backward(*f64(dy, x, in_center, in_scale, in_shift, weight, bias, gamma, mean, rstd), batch_stats,
                              dy_means.double(), act)
        return [o[0].to(x.dtype), o[1].to(weight.dtype), o[2].to(bias.dtype)] + [v.to(gamma.dtype) for v in o[3:]]
    K = weight.shape[2]
    dweight = new_output(torch.empty_like(weight, memory_format=torch.contiguous_format))
    weight = _tap_major(weight)
    acc = acc_dtype(x.dtype)
    ACC = tl_acc(x.dtype)
    affine = in_scale.numel() > 0
    sums_given = dy_means.numel() > 0
    if sums_given and (not batch_stats or tuple(dy_means.shape) != (3, C) or dy_means.dtype != gamma.dtype):
        raise RuntimeError(f"dw_block_backward: dy_means must be a (3, {C}) {gamma.dtype} tensor with batch "
                           f"statistics, got {dy_means.dtype} {tuple(dy_means.shape)}")
    dscale = new_output(torch.empty_like(in_scale))
    dshift = new_output(torch.empty_like(in_shift))
    if not affine:
        in_center = in_scale = in_shift = gamma  # never read (AFFINE=False)
    dx = new_output(torch.empty_like(x))
    dbias = new_output(torch.empty_like(bias))
    dt = new_output(torch.empty_like(x, dtype=acc))
    S = _splits(x, C)
    geom = (N, C, H, W) + tuple(x.stride())
    part_dy = new_output(torch.empty((3, S, C), dtype=acc, device=x.device))
    dhat = torch.zeros(C, dtype=acc, device=x.device)
    if sums_given:  # c1, c2 and dhat are the given means: dt kernel with M = 1
        c1_src, c2_src, count = dy_means[0], dy_means[1], 1
        dhat = dy_means[2].contiguous()
        dgamma = dbeta = gamma.new_empty(0)
    else:
        dgamma = new_output(torch.empty_like(gamma))
        dbeta = new_output(torch.empty_like(gamma))
        c1_src, c2_src, count = dbeta, dgamma, N * H * W
        if batch_stats:
            # The saved mean is rounded (off the exact mean of g by up to ulp(mean)/2), so every ghat shares
            # an offset dhat = mean(ghat) that is large against 1 when |mean| >> std or M is tiny; it would
            # give dt a common component that dw = sum dt*u and db = sum dt multiply by the full mean of u.
            # ghat is centred exactly instead: ghat - dhat in the dt pass, and sum dy*(ghat - dhat) =
            # dgamma - dhat*dbeta (the CPU backend's delta, csrc/cpu/dw_block.cpp backward_impl).
            _backward_reduce(dy, x, in_center, in_scale, in_shift, weight, bias, mean, rstd, affine, act, part_dy,
                             dbeta, dgamma, dhat)
            dhat.div_(count)
            dgamma.sub_(dhat * dbeta)
    part_dw = new_output(torch.empty((S, K * K, C), dtype=acc, device=x.device))  # tap-major partials
    part_db = new_output(torch.empty((S, C), dtype=acc, device=x.device))
    _dw_backward_dt_kernel[lambda m: (S, triton.cdiv(C, m["BLOCK_C"]))](
        dy, x, in_center, in_scale, in_shift, weight, bias, gamma, mean, rstd, c1_src, c2_src, dhat, dt, part_dw,
        part_db, part_dy, count, *geom, *dy.stride(), *dt.stride(), K=K, ACT=act, AFFINE=affine, ACC=ACC,
        TRAINING=batch_stats,
        KK_PAD=triton.next_power_of_2(K * K))
    if not batch_stats:
        sum_rows(part_dy[0], dbeta)   # dbeta = sum dy
        sum_rows(part_dy[1], dgamma)  # dgamma = sum dy*ghat
    part_aff = new_output(torch.empty((2, S, C), dtype=acc, device=x.device)) if affine else dt
    _dw_backward_dx_kernel[lambda m: (S, triton.cdiv(C, m["BLOCK_C"]))](
        dy, dt, weight, x, in_center, in_scale, dx, part_aff, N, C, H, W, *dy.stride(), *dt.stride(), *dx.stride(), K=K,
        AFFINE=affine, ACC=ACC)
    dw_kc = torch.empty((K * K, C), dtype=weight.dtype, device=x.device)
    sum_rows(part_dw, dw_kc)
    dweight.copy_(dw_kc.t().reshape(dweight.shape))
    sum_rows(part_db, dbias)
    if affine:
        sum_rows(part_aff[0], dscale)  # d in_scale = sum du*(x - in_center)
        sum_rows(part_aff[1], dshift)  # d in_shift = sum du
    return [dx, dweight, dbias, dgamma, dbeta, dscale, dshift]
