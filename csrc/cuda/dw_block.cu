// Fused depthwise block on the GPU:  y = u + gamma * (act(dwconv_k(u) + b) - mean) * rstd + beta, where
// u = in_scale[c]*(x - in_center[c]) + in_shift[c] (the previous pointwise block's BN apply folded into this block's
// loads, DESIGN.md section 3) or u = x without an input affine. DESIGN.md section 3 is the
// specification; the formulas come from ../common/block_math.h.
//
// Kernels (fp32 accumulation for fp32/fp16/bf16, fp64 for fp64, which runs the generic kernels only: the
// launchers' exact path for training with few values per channel; NCHW and channels_last):
//   dw_conv_tile_kernel<T, K, MODE>  k = 1..9 (K a template parameter, the conv fully unrolled). A block
//                             owns kTileC channels x a th x tw spatial tile of one image. It stages u on the
//                             tile plus its k-1 halo in shared memory once (fp32, the input affine applied on
//                             the way in; out-of-image taps are 0: the zero padding is of u), then each
//                             thread computes kRowOut outputs along a row from a register sliding window,
//                             its channel's k*k weights in registers. The epilogue runs on the registers:
//                               MODE kApply   eval (the only pass) and training pass 2: y = u + A*g + B, the
//                                             residual u read from the staged tile; y staged in shared
//                                             memory and stored in 16-byte channel packs (channels_last);
//                               MODE kStats   training pass 1: per-tile Chan/Welford (count, mean, M2) of g;
//                               MODE kReduce  backward pass 1: per-tile sum dy, sum dy*ghat, sum ghat (dy staged).
//                             One partial per (tile, channel); welford_finalize_kernel / sum_splits_kernel
//                             merge them. int32 offsets inside an image, int64 only for the image base.
//   dw_*_generic_kernel       the same three passes for k > 9 (or shapes past the tiled kernel's int32 and
//                             grid limits): one thread per output (or 16-byte pack), taps from global memory.
//   dw_backward_tile_kernel   backward pass 2 on spatial tiles in shared memory: u tile with a double
//                             halo -> t, dt on the tile plus a halo -> du = dy + conv_transpose(dt),
//                             dx = in_scale*du; per-(channel, tap) partials of dw and db accumulated
//                             across the tiles a block owns, and per-channel sums of du*(x - center) and du
//                             (din_scale, din_shift); sum_splits_kernel adds the blocks' partials.
// Every read of x goes through the input affine (in-bounds elements only: the zero padding is of u).
// Launches go on the caller's stream and are checked. Under CMK_CUDA_EMULATION this file compiles as
// host C++ against ../cuda_emu/cuda_emu.h (csrc/cuda_emu/dw_block_emu.cpp).
#include "cuda_common.cuh"

namespace cmk {
namespace CMK_KNS {

// One channel's input affine u = sc*(x - ce) + sh. The centre comes off first, as in BatchNorm: x - ce
// is exact when x is near it, where sc*x + (sh - sc*ce) would cancel for |mean| >> std.
template <typename A>
struct ChannelAffine {
  A ce, sc, sh;
  CMK_DEV A operator()(A x) const { return sc * (x - ce) + sh; }
};

// The block's input u = scale[c]*(x - center[c]) + shift[c], in the accumulation type and not rounded: the
// previous pointwise block's BN apply, folded into this block's loads. Null pointers (no input affine): u = x.
template <typename A>
struct InputAffine {
  const A* center;
  const A* scale;
  const A* shift;
  CMK_DEV ChannelAffine<A> of(int64_t c) const {
    return scale != nullptr ? ChannelAffine<A>{center[c], scale[c], shift[c]} : ChannelAffine<A>{0, 1, 0};
  }
};

namespace {  // (the two above are captured by the launchers' lambdas, members of exported templates)

constexpr int kMaxGradItems = 8;  // (channel, tap) accumulators per thread in the backward tile kernel

// t = b + sum_{i,j} w[c,i,j] * u[n, c, h+i-pl, w+j-pl] with u = af(x) read from global memory
// (zero padding of u).
template <typename T, typename A = acc_of<T>>
CMK_DEV A conv_at(const Layout& L, int k, const T* __restrict__ x, ChannelAffine<A> af, const T* __restrict__ w,
                  A bias, int64_t n, int64_t c, int64_t h, int64_t wc) {
  const int pl = (k - 1) / 2;
  const T* wrow = w + c * k * k;
  A acc = bias;
  for (int i = 0; i < k; ++i) {
    const int64_t hh = h + i - pl;
    if (hh < 0 || hh >= L.H) continue;
    for (int j = 0; j < k; ++j) {
      const int64_t ww = wc + j - pl;
      if (ww < 0 || ww >= L.W) continue;
      acc += to_acc(wrow[i * k + j]) * af(to_acc(x[elem_offset(L, n, c, hh * L.W + ww)]));
    }
  }
  return acc;
}

// grid (channel groups, splits); writes ws[split][c][3] = (count, mean, M2) of act(t).
template <typename T, int ACT>
__global__ void dw_stats_generic_kernel(Layout L, int k, const T* __restrict__ x, InputAffine<acc_of<T>> in,
                                        const T* __restrict__ w, const T* __restrict__ b, int cpb, int64_t chunk,
                                        acc_of<T>* __restrict__ ws) {
  using A = acc_of<T>;
  const int tid = threadIdx.x, lane_c = tid % cpb;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * cpb + lane_c;
  const int64_t M = L.N * L.HW, m0 = blockIdx.y * chunk, m1 = m0 + chunk < M ? m0 + chunk : M;
  Welford<A> acc;
  if (c < L.C) {
    const A bc = to_acc(b[c]);
    const ChannelAffine<A> af = in.of(c);
    for (int64_t m = m0 + tid / cpb; m < m1; m += blockDim.x / cpb) {
      const int64_t n = m / L.HW, pix = m % L.HW;
      const A t = conv_at(L, k, x, af, w, bc, n, c, pix / L.W, pix % L.W);
      acc.merge(A(1), act_forward<ACT>(t), A(0));
    }
  }
  block_channel_welford(acc, cpb);
  if (tid < cpb && c < L.C) {
    A* o = ws + (static_cast<int64_t>(blockIdx.y) * L.C + c) * 3;
    o[0] = acc.count;
    o[1] = acc.mean;
    o[2] = acc.m2;
  }
}

// Grid-stride over items: NCHW one element each; channels_last VEC consecutive channels of a pixel.
// u = af(x) on every tap and on the residual.
template <typename T, int ACT, bool CL, int VEC>
__global__ void dw_apply_generic_kernel(Layout L, int k, const T* __restrict__ x, InputAffine<acc_of<T>> in,
                                        const T* __restrict__ w, const T* __restrict__ b,
                                        const acc_of<T>* __restrict__ gamma, const acc_of<T>* __restrict__ beta,
                                        const acc_of<T>* __restrict__ mean, const acc_of<T>* __restrict__ rstd,
                                        T* __restrict__ y, int64_t items) {
  using A = acc_of<T>;
  using P = Pack<T, VEC>;
  const int pl = (k - 1) / 2, kk = k * k;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t item = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; item < items; item += stride) {
    int64_t n, c0, pix;
    if (CL) {
      const int64_t cv = L.C / VEC;
      c0 = (item % cv) * VEC;
      const int64_t m = item / cv;
      n = m / L.HW;
      pix = m % L.HW;
    } else {
      pix = item % L.HW;
      c0 = (item / L.HW) % L.C;
      n = item / (L.HW * L.C);
    }
    const int64_t h = pix / L.W, wc = pix % L.W;
    A acc[VEC];
    ChannelAffine<A> af[VEC];
    for (int v = 0; v < VEC; ++v) {
      acc[v] = to_acc(b[c0 + v]);
      af[v] = in.of(c0 + v);
    }
    for (int i = 0; i < k; ++i) {
      const int64_t hh = h + i - pl;
      if (hh < 0 || hh >= L.H) continue;
      for (int j = 0; j < k; ++j) {
        const int64_t ww = wc + j - pl;
        if (ww < 0 || ww >= L.W) continue;
        const P xv = *reinterpret_cast<const P*>(x + elem_offset(L, n, c0, hh * L.W + ww));
        for (int v = 0; v < VEC; ++v)
          acc[v] += to_acc(w[(c0 + v) * kk + i * k + j]) * af[v](to_acc(xv.v[v]));
      }
    }
    const int64_t off = elem_offset(L, n, c0, pix);
    const P xc = *reinterpret_cast<const P*>(x + off);
    P out;
    for (int v = 0; v < VEC; ++v) {
      const int64_t c = c0 + v;
      const A a = gamma[c] * rstd[c];
      const A u = af[v](to_acc(xc.v[v]));
      out.v[v] = from_acc<T>(u + a * act_forward<ACT>(acc[v]) + (beta[c] - mean[c] * a));
    }
    *reinterpret_cast<P*>(y + off) = out;
  }
}

// grid (channel groups, splits); ws[split][c][3] = (sum dy, sum dy*ghat, sum ghat).
template <typename T, int ACT>
__global__ void dw_backward_reduce_generic_kernel(Layout L, int k, const T* __restrict__ dy, const T* __restrict__ x,
                                                  InputAffine<acc_of<T>> in, const T* __restrict__ w,
                                                  const T* __restrict__ b, const acc_of<T>* __restrict__ mean,
                                                  const acc_of<T>* __restrict__ rstd, int cpb, int64_t chunk,
                                                  acc_of<T>* __restrict__ ws) {
  using A = acc_of<T>;
  const int tid = threadIdx.x, lane_c = tid % cpb;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * cpb + lane_c;
  const int64_t M = L.N * L.HW, m0 = blockIdx.y * chunk, m1 = m0 + chunk < M ? m0 + chunk : M;
  A s[3] = {0, 0, 0};
  if (c < L.C) {
    const A bc = to_acc(b[c]), mu = mean[c], rs = rstd[c];
    const ChannelAffine<A> af = in.of(c);
    for (int64_t m = m0 + tid / cpb; m < m1; m += blockDim.x / cpb) {
      const int64_t n = m / L.HW, pix = m % L.HW;
      const A t = conv_at(L, k, x, af, w, bc, n, c, pix / L.W, pix % L.W);
      const A d = to_acc(dy[elem_offset(L, n, c, pix)]), ghat = (act_forward<ACT>(t) - mu) * rs;
      s[0] += d;
      s[1] += d * ghat;
      s[2] += ghat;
    }
  }
  block_channel_sums<3>(s, cpb);
  if (tid < cpb && c < L.C) {
    A* o = ws + (static_cast<int64_t>(blockIdx.y) * L.C + c) * 3;
    o[0] = s[0];
    o[1] = s[1];
    o[2] = s[2];
  }
}

// --- the tiled kernel of the three single-conv passes (k = 1..9) ---------------------------------------

constexpr int kTileC = 8;              // channels per block: one 16-byte pack of fp16/bf16 in channels_last
constexpr int kTilePix = kTileC + 1;   // floats per staged pixel: the pad puts a warp's 4 row segments on
                                       // distinct banks (a segment is kRowOut * kTilePix = 72 floats = 8 banks on)
constexpr int kRowOut = 8;             // outputs per thread along a row: the register sliding window
constexpr int kMaxTiledK = 9;
constexpr int kTileThreads = 256;      // blockDim of the tiled kernel on the GPU (__launch_bounds__)
enum TileMode : int { kApply = 0, kStats = 1, kReduce = 2 };

// The spatial tiling of one image: th x tw output pixels per block (tw a multiple of kRowOut).
struct ConvTiling {
  int th, tw, tiles_h, tiles_w;
};

// g = act(v) on a register row; act is uniform across the grid, so the branch is taken once per row.
template <int NV>
CMK_DEV void act_forward_row(int act, float (&v)[NV]) {
  if (act == kGelu) {
    for (int r = 0; r < NV; ++r) v[r] = act_forward<kGelu>(v[r]);
  } else if (act == kGeluTanh) {
    for (int r = 0; r < NV; ++r) v[r] = act_forward<kGeluTanh>(v[r]);
  } else {
    for (int r = 0; r < NV; ++r) v[r] = act_forward<kRelu>(v[r]);
  }
}

// Copies a rows x cols pixel window of the image (origin h_org, w_org, may lie outside it) x the block's
// kTileC channels from global memory into `dst` [rows][cols][pix_stride] as fp32, with f(c, x) applied to
// in-image elements and 0 elsewhere (and past C). channels_last with vec moves 16-byte channel packs;
// NCHW walks the columns fastest, so a warp reads along rows.
template <typename T, typename F>
CMK_DEV void stage_window(const Layout& L, const T* __restrict__ img, int c0, int h_org, int w_org, int rows,
                          int cols, bool vec, float* dst, int pix_stride, F f) {
  constexpr int V = pack16<T>() < kTileC ? pack16<T>() : kTileC;
  using P = Pack<T, V>;
  const int C = static_cast<int>(L.C), H = static_cast<int>(L.H), W = static_cast<int>(L.W);
  const int tid = threadIdx.x, nt = blockDim.x;
  if (L.sC == 1) {  // channels_last: pixel stride C
    constexpr int CP = kTileC / V;
    for (int e = tid; e < rows * cols * CP; e += nt) {
      const int pv = e % CP, q = e / CP, hh = h_org + q / cols, ww = w_org + q % cols, cb = c0 + pv * V;
      float* d = dst + q * pix_stride + pv * V;
      if (hh < 0 || hh >= H || ww < 0 || ww >= W) {
        for (int v = 0; v < V; ++v) d[v] = 0.f;
        continue;
      }
      const T* src = img + (hh * W + ww) * C + cb;
      if (vec && cb + V <= C) {
        const P pk = *reinterpret_cast<const P*>(src);
        for (int v = 0; v < V; ++v) d[v] = f(cb + v, to_acc(pk.v[v]));
      } else {
        for (int v = 0; v < V; ++v) d[v] = cb + v < C ? f(cb + v, to_acc(src[v])) : 0.f;
      }
    }
  } else {  // NCHW: channel planes of H*W
    for (int e = tid; e < rows * cols * kTileC; e += nt) {
      const int col = e % cols, q = e / cols, row = q % rows, cl = q / rows;
      const int hh = h_org + row, ww = w_org + col, c = c0 + cl;
      const bool in = hh >= 0 && hh < H && ww >= 0 && ww < W && c < C;
      dst[(row * cols + col) * pix_stride + cl] = in ? f(c, to_acc(img[c * H * W + hh * W + ww])) : 0.f;
    }
  }
}

// dst[r][c] = bias + sum_{i,j < K} wk[i][j] * src[r+i][c+j] for r < rows, c < cols (a multiple of
// kRowOut), on this thread's channel lane (tid % kTileC; blockDim % kTileC == 0); wk = w, or w rotated by
// 180 degrees (FLIP: the transposed conv of the backward). src [rows+K-1][src_cols][kTilePix], dst
// [rows][dst_cols][dst_pix]. Each thread computes row segments of kRowOut outputs from a register
// sliding window: per kernel row, kRowOut+K-1 shared-memory loads feed K*kRowOut FMAs. Taps are summed
// in (i, j) order from the bias, so the forward and the backward's recomputation of t agree bitwise.
template <int K, bool FLIP>
CMK_DEV void conv_rows(const float* src, int src_cols, float* dst, int dst_cols, int dst_pix, int rows, int cols,
                       const float (&wt)[K * K], float bias) {
  constexpr int WIN = kRowOut + K - 1;
  const int tid = threadIdx.x, cl = tid % kTileC;
  // Row segments s = (srow, sidx) advance by blockDim / kTileC per iteration, carried without a division.
  const int spr = cols / kRowOut, step = blockDim.x / kTileC, step_rows = step / spr, step_idx = step % spr;
  int srow = (tid / kTileC) / spr, sidx = (tid / kTileC) % spr;
  const int row_stride = src_cols * kTilePix;
  while (srow < rows) {
    float acc[kRowOut];
#pragma unroll
    for (int r = 0; r < kRowOut; ++r) acc[r] = bias;
    const float* base = src + (srow * src_cols + sidx * kRowOut) * kTilePix + cl;
#pragma unroll
    for (int i = 0; i < K; ++i) {
      float win[WIN];  // src[srow + i][scol .. scol + kRowOut + K - 2]: each tap of the row reads it shifted
#pragma unroll
      for (int j = 0; j < WIN; ++j) win[j] = base[i * row_stride + j * kTilePix];
#pragma unroll
      for (int j = 0; j < K; ++j) {
        const float wv = FLIP ? wt[(K - 1 - i) * K + (K - 1 - j)] : wt[i * K + j];
#pragma unroll
        for (int r = 0; r < kRowOut; ++r) acc[r] += wv * win[r + j];
      }
    }
    float* out = dst + (srow * dst_cols + sidx * kRowOut) * dst_pix + cl;
#pragma unroll
    for (int r = 0; r < kRowOut; ++r) out[r * dst_pix] = acc[r];
    sidx += step_idx;
    srow += step_rows;
    if (sidx >= spr) {
      sidx -= spr;
      ++srow;
    }
  }
}

// Threads per (channel, tap row) of the backward's dw reduction: blockDim split into parts of kTileC*K
// (one part, each thread looping over items, when blockDim < kTileC*K).
CMK_HD int tile_grad_parts(int k, int threads) { return threads / (kTileC * k) > 0 ? threads / (kTileC * k) : 1; }

// The per-output epilogue of dw_conv_tile_kernel, on the tile's t values in shared memory (ts, indexed
// [pixel][kTileC]); u at pixel (row, col) is us[((row + PL) * XW + col + PL) * kTilePix + channel].
struct TileView {
  int th, tw, h0, w0, c0, H, W, C, XW, PL;
  const float* us;
  float* ts;
  CMK_DEV bool pixel_ok(int q) const { return h0 + q / tw < H && w0 + q % tw < W; }
  CMK_DEV float u_at(int q, int cl) const { return us[((q / tw + PL) * XW + q % tw + PL) * kTilePix + cl]; }
};

// kApply: y = u + A*act(t) + B (ab = A[kTileC], B[kTileC]); channels_last with vec stores 16-byte packs.
template <typename T, int ACT>
CMK_DEV void tile_apply_epilogue(const TileView& v, const float* ab, bool channels_last, bool vec, T* __restrict__ yimg) {
  constexpr int V = pack16<T>() < kTileC ? pack16<T>() : kTileC;
  using P = Pack<T, V>;
  const int tid = threadIdx.x, nt = blockDim.x, npix = v.th * v.tw;
  if (channels_last) {
    constexpr int CP = kTileC / V;
    for (int e = tid; e < npix * CP; e += nt) {
      const int pv = e % CP, q = e / CP, cb = v.c0 + pv * V;
      if (!v.pixel_ok(q)) continue;
      P out;
      for (int j = 0; j < V; ++j) {
        const int cl = pv * V + j;
        out.v[j] = from_acc<T>(v.u_at(q, cl) + ab[cl] * act_forward<ACT>(v.ts[q * kTileC + cl]) + ab[kTileC + cl]);
      }
      T* dst = yimg + ((v.h0 + q / v.tw) * v.W + v.w0 + q % v.tw) * v.C + cb;
      if (vec && cb + V <= v.C) {
        *reinterpret_cast<P*>(dst) = out;
      } else {
        for (int j = 0; j < V && cb + j < v.C; ++j) dst[j] = out.v[j];
      }
    }
  } else {  // NCHW: columns fastest, so a warp stores along a row of a channel plane
    for (int e = tid; e < npix * kTileC; e += nt) {
      const int col = e % v.tw, q0 = e / v.tw, row = q0 % v.th, cl = q0 / v.th, q = row * v.tw + col;
      if (!v.pixel_ok(q) || v.c0 + cl >= v.C) continue;
      const float y = v.u_at(q, cl) + ab[cl] * act_forward<ACT>(v.ts[q * kTileC + cl]) + ab[kTileC + cl];
      yimg[(v.c0 + cl) * v.H * v.W + (v.h0 + row) * v.W + v.w0 + col] = from_acc<T>(y);
    }
  }
}

// kStats: this thread's channel lane (tid % kTileC); exact two-pass mean and M2 of g - shift over the
// thread's pixels (g - shift kept in ts between the passes), then merged over the block per channel.
// shift = act(b[c]), the same in every block: partial means stay small (no rounding at the scale of a
// large common offset of g, e.g. a large bias) and the finalize adds shift back once.
template <int ACT>
CMK_DEV Welford<float> tile_stats_epilogue(const TileView& v, float shift) {
  const int tid = threadIdx.x, nt = blockDim.x, n_items = v.th * v.tw * kTileC;
  const bool c_ok = v.c0 + tid % kTileC < v.C;
  float s = 0.f, cnt = 0.f;
  for (int e = tid; e < n_items; e += nt) {
    if (!c_ok || !v.pixel_ok(e / kTileC)) continue;
    const float g = act_forward<ACT>(v.ts[e]) - shift;
    v.ts[e] = g;
    s += g;
    cnt += 1.f;
  }
  Welford<float> w;
  if (cnt > 0.f) {
    const float m = s / cnt;
    float m2 = 0.f;
    for (int e = tid; e < n_items; e += nt) {
      if (!c_ok || !v.pixel_ok(e / kTileC)) continue;
      const float d = v.ts[e] - m;
      m2 += d * d;
    }
    w.merge(cnt, m, m2);
  }
  return w;
}

// kReduce: sum dy, sum dy*ghat and sum ghat, ghat = (act(t) - mean)*rstd, over this thread's pixels (dy
// staged in ds [pixel][kTileC]).
template <int ACT>
CMK_DEV void tile_reduce_epilogue(const TileView& v, const float* ds, float mu, float rs, float (&sums)[3]) {
  const int tid = threadIdx.x, nt = blockDim.x, n_items = v.th * v.tw * kTileC;
  if (v.c0 + tid % kTileC >= v.C) return;
  for (int e = tid; e < n_items; e += nt) {
    if (!v.pixel_ok(e / kTileC)) continue;
    const float d = ds[e], ghat = (act_forward<ACT>(v.ts[e]) - mu) * rs;
    sums[0] += d;
    sums[1] += d * ghat;
    sums[2] += ghat;
  }
}

// grid (N * tiles_h * tiles_w, ceil(C / kTileC)), blockDim a multiple of 32. Dynamic shared memory (fp32):
// u [(th+K-1) x (tw+K-1) x kTilePix], t [th x tw x kTileC], (A, B) [2 x kTileC] (kApply). kReduce stages dy
// [th x tw x kTileC] into the u region once the conv is done, so every mode fits two blocks per SM.
//   t[h,w] = b + sum_{i,j < K} w[i,j] * u[h+i-pl, w+j-pl]   (pl = (K-1)/2; taps summed in (i, j) order)
//   kApply : y = u[h,w] + A*act(t) + B,  A = gamma*rstd, B = beta - mean*A
//   kStats : ws[tile][c] = (count, mean, M2) of g = act(t) over the tile
//   kReduce: ws[tile][c] = (sum dy, sum dy*ghat, sum ghat),  ghat = (g - mean)*rstd
// The conv loop is activation-free (act is applied by the epilogue, dispatched once per block), so the
// loop's code is the same for every activation.
template <typename T, int K, int MODE>
__global__ void __launch_bounds__(kTileThreads, 2)
    dw_conv_tile_kernel(Layout L, ConvTiling g, int act, bool vec, const T* __restrict__ x, InputAffine<float> in,
                        const T* __restrict__ w, const T* __restrict__ b, const float* __restrict__ gamma,
                        const float* __restrict__ beta, const float* __restrict__ mean,
                        const float* __restrict__ rstd, const T* __restrict__ dy, T* __restrict__ y,
                        float* __restrict__ ws) {
  CMK_DYNAMIC_SHARED(float, smem);
  constexpr int PL = (K - 1) / 2;
  const int tid = threadIdx.x;
  const int C = static_cast<int>(L.C), H = static_cast<int>(L.H), W = static_cast<int>(L.W);
  const int tile = blockIdx.x, per_image = g.tiles_h * g.tiles_w;
  const int c0 = blockIdx.y * kTileC;
  const int64_t n = tile / per_image;
  const int h0 = (tile % per_image) / g.tiles_w * g.th, w0 = (tile % per_image) % g.tiles_w * g.tw;
  const int XW = g.tw + K - 1, npix = g.th * g.tw;
  float* us = smem;
  float* ts = us + (g.th + K - 1) * XW * kTilePix;
  float* ab = ts + npix * kTileC;  // kApply: A[kTileC], B[kTileC]

  stage_window(L, x + n * L.sN, c0, h0 - PL, w0 - PL, g.th + K - 1, XW, vec, us, kTilePix,
               [&](int c, float v) { return in.of(c)(v); });
  if (MODE == kApply && tid < kTileC) {
    const int c = c0 + tid;
    const float a = c < C ? gamma[c] * rstd[c] : 0.f;
    ab[tid] = a;
    ab[kTileC + tid] = c < C ? beta[c] - mean[c] * a : 0.f;
  }
  __syncthreads();

  {  // the conv: this thread's channel is fixed (blockDim % kTileC == 0); its k*k weights in registers
    const int c = c0 + tid % kTileC;
    float wt[K * K];
#pragma unroll
    for (int i = 0; i < K * K; ++i) wt[i] = c < C ? to_acc(w[c * K * K + i]) : 0.f;
    conv_rows<K, false>(us, XW, ts, g.tw, kTileC, g.th, g.tw, wt, c < C ? to_acc(b[c]) : 0.f);
  }
  __syncthreads();

  const TileView v{g.th, g.tw, h0, w0, c0, H, W, C, XW, PL, us, ts};
  if (MODE == kApply) {
    T* yimg = y + n * L.sN;
    const bool cl_layout = L.sC == 1;
    if (act == kGelu) tile_apply_epilogue<T, kGelu>(v, ab, cl_layout, vec, yimg);
    else if (act == kGeluTanh) tile_apply_epilogue<T, kGeluTanh>(v, ab, cl_layout, vec, yimg);
    else tile_apply_epilogue<T, kRelu>(v, ab, cl_layout, vec, yimg);
  } else if (MODE == kStats) {
    // ws: [tiles][C][3] partials, then the shift [C] (written by the first tile's blocks)
    const int c = c0 + tid % kTileC;
    const float bc = c < C ? to_acc(b[c]) : 0.f;
    const float shift = act == kGelu ? act_forward<kGelu>(bc) : act == kGeluTanh ? act_forward<kGeluTanh>(bc)
                                                                                 : act_forward<kRelu>(bc);
    Welford<float> st = act == kGelu       ? tile_stats_epilogue<kGelu>(v, shift)
                        : act == kGeluTanh ? tile_stats_epilogue<kGeluTanh>(v, shift)
                                           : tile_stats_epilogue<kRelu>(v, shift);
    block_channel_welford(st, kTileC);
    if (tid < kTileC && c < C) {
      float* o = ws + (static_cast<int64_t>(tile) * C + c) * 3;
      o[0] = st.count;
      o[1] = st.mean;
      o[2] = st.m2;
      if (tile == 0) ws[static_cast<int64_t>(gridDim.x) * C * 3 + c] = shift;
    }
  } else {
    float* ds = us;  // the conv is done with u
    stage_window(L, dy + n * L.sN, c0, h0, w0, g.th, g.tw, vec, ds, kTileC, [](int, float v) { return v; });
    __syncthreads();
    const int c = c0 + tid % kTileC;
    const float mu = c < C ? mean[c] : 0.f, rs = c < C ? rstd[c] : 0.f;
    float sums[3] = {0.f, 0.f, 0.f};
    if (act == kGelu) tile_reduce_epilogue<kGelu>(v, ds, mu, rs, sums);
    else if (act == kGeluTanh) tile_reduce_epilogue<kGeluTanh>(v, ds, mu, rs, sums);
    else tile_reduce_epilogue<kRelu>(v, ds, mu, rs, sums);
    block_channel_sums<3>(sums, kTileC);
    if (tid < kTileC && c0 + tid < C) {
      float* o = ws + (static_cast<int64_t>(tile) * C + c0 + tid) * 3;
      o[0] = sums[0];
      o[1] = sums[1];
      o[2] = sums[2];
    }
  }
}

// --- backward pass 2, tiled (k = 1..9) -------------------------------------------------------------------

// dt on the dt region (origin h_org, w_org): dt = A*(dy - c1 - ghat*c2)*act'(t), ghat = (act(t) - mean)*rstd
// - dhat, with t read from and dt written to dts [DH][DWR][kTilePix]; 0 outside the image (and past C).
template <int ACT>
CMK_DEV void tile_dt_epilogue(float* dts, const float* dys, int DH, int DW, int DWR, int h_org, int w_org, int H,
                              int W, bool c_ok, float a, float mu, float rs, float dhat, float c1, float c2) {
  const int tid = threadIdx.x, nt = blockDim.x, cl = tid % kTileC;
  for (int e = tid; e < DH * DW * kTileC; e += nt) {
    const int q = e / kTileC, row = q / DW, col = q % DW, hh = h_org + row, ww = w_org + col;
    float* p = dts + (row * DWR + col) * kTilePix + cl;
    float dt = 0.f;
    if (c_ok && hh >= 0 && hh < H && ww >= 0 && ww < W) {
      const float t = *p;
      const float ghat = (act_forward<ACT>(t) - mu) * rs - dhat;
      dt = a * (dys[e] - c1 - ghat * c2) * act_backward<ACT>(t);
    }
    *p = dt;
  }
}

// grid (N * tiles_h * tiles_w, ceil(C / kTileC)), one th x tw tile (tw a multiple of kRowOut) of kTileC
// channels per block. With pl = (K-1)/2, pr = K-1-pl and the dt region = the tile grown by pr above/left
// and pl below/right (DH x DW = (th+K-1) x (tw+K-1)):
//   1. stage u on the dt region plus a K-1 halo (origin h0-pr-pl, w0-pr-pl) and dy on the dt region;
//   2. t on the dt region (the forward's conv_rows, the same summation order), then in place
//      dt = A*(dy - c1 - ghat*c2)*act'(t)   (c1, c2 = mean dy, mean dy*ghat in training; 0 in eval);
//   3. dw[i,j] = sum_tile dt[h,w] * u[h+i-pl, w+j-pl], db = sum_tile dt: thread (channel, tap row i,
//      part) slides a register window over its rows; the parts are added in a fixed order;
//   4. du = dy + sum_{i,j} w[i,j] * dt[h-i+pl, w-j+pl] (conv_rows with the kernel rotated by 180 degrees),
//      dx = in_scale*du; din_scale += du*(x - in_center), din_shift += du.
// ws[tile][c][K*K + 3] = (dw taps, db, din_scale, din_shift) partials; sum_splits_kernel adds the tiles.
// Dynamic shared memory (fp32): u [DH+K-1][DWR+K-1][kTilePix] (later du), dt [DH][DWR][kTilePix],
// dy [DH][DW][kTileC], parts [P][kTileC][K*K+1] with DWR = DW rounded up to kRowOut, P = tile_grad_parts.
template <typename T, int K>
__global__ void __launch_bounds__(kTileThreads, 2)
    dw_backward_tile_kernel(Layout L, ConvTiling g, int act, const T* __restrict__ x, InputAffine<float> in,
                            const T* __restrict__ dy, const T* __restrict__ w, const T* __restrict__ b,
                            const float* __restrict__ gamma, const float* __restrict__ mean,
                            const float* __restrict__ rstd, const float* __restrict__ sums, float inv_m,
                            bool batch_stats, bool vec, T* __restrict__ dx, float* __restrict__ ws) {
  CMK_DYNAMIC_SHARED(float, smem);
  constexpr int PL = (K - 1) / 2, PR = K - 1 - PL, KK = K * K, NCOLS = KK + 3;
  const int tid = threadIdx.x, nt = blockDim.x;
  const int C = static_cast<int>(L.C), H = static_cast<int>(L.H), W = static_cast<int>(L.W);
  const int tile = blockIdx.x, per_image = g.tiles_h * g.tiles_w, c0 = blockIdx.y * kTileC;
  const int64_t n = tile / per_image;
  const int h0 = (tile % per_image) / g.tiles_w * g.th, w0 = (tile % per_image) % g.tiles_w * g.tw;
  const int DH = g.th + K - 1, DW = g.tw + K - 1, DWR = (DW + kRowOut - 1) / kRowOut * kRowOut;
  const int UH = DH + K - 1, UW = DWR + K - 1, P = tile_grad_parts(K, nt);
  float* us = smem;
  float* dts = us + UH * UW * kTilePix;
  float* dys = dts + DH * DWR * kTilePix;
  float* parts = dys + DH * DW * kTileC;

  stage_window(L, x + n * L.sN, c0, h0 - PR - PL, w0 - PR - PL, UH, UW, vec, us, kTilePix,
               [&](int c, float v) { return in.of(c)(v); });
  stage_window(L, dy + n * L.sN, c0, h0 - PR, w0 - PR, DH, DW, vec, dys, kTileC, [](int, float v) { return v; });
  __syncthreads();

  const int cl = tid % kTileC, c = c0 + cl;
  const bool c_ok = c < C;
  float wt[KK];
#pragma unroll
  for (int i = 0; i < KK; ++i) wt[i] = c_ok ? to_acc(w[c * KK + i]) : 0.f;
  conv_rows<K, false>(us, UW, dts, DWR, kTilePix, DH, DWR, wt, c_ok ? to_acc(b[c]) : 0.f);
  __syncthreads();
  {
    const float mu = c_ok ? mean[c] : 0.f, rs = c_ok ? rstd[c] : 0.f, a = c_ok ? gamma[c] * rs : 0.f;
    const float c1 = batch_stats && c_ok ? sums[c * 3] * inv_m : 0.f;
    const float c2 = batch_stats && c_ok ? sums[c * 3 + 1] * inv_m : 0.f;
    const float dh = batch_stats && c_ok ? sums[c * 3 + 2] : 0.f;
    if (act == kGelu)
      tile_dt_epilogue<kGelu>(dts, dys, DH, DW, DWR, h0 - PR, w0 - PR, H, W, c_ok, a, mu, rs, dh, c1, c2);
    else if (act == kGeluTanh)
      tile_dt_epilogue<kGeluTanh>(dts, dys, DH, DW, DWR, h0 - PR, w0 - PR, H, W, c_ok, a, mu, rs, dh, c1, c2);
    else tile_dt_epilogue<kRelu>(dts, dys, DH, DW, DWR, h0 - PR, w0 - PR, H, W, c_ok, a, mu, rs, dh, c1, c2);
  }
  __syncthreads();

  // 3. dw and db: the tile's dt is 0 outside the image, so whole row segments need no mask.
  for (int item = tid; item < P * kTileC * K; item += nt) {  // more items than threads only under emulation
    const int i = (item / kTileC) % K, part = item / (kTileC * K);
    float acc[K], db = 0.f;
#pragma unroll
    for (int j = 0; j < K; ++j) acc[j] = 0.f;
    for (int row = part; row < g.th; row += P) {
      const float* drow = dts + ((row + PR) * DWR + PR) * kTilePix + cl;
      const float* urow = us + ((row + PR + i) * UW + PR) * kTilePix + cl;
      for (int col = 0; col < g.tw; col += kRowOut) {
        float dv[kRowOut], uw[kRowOut + K - 1];
#pragma unroll
        for (int r = 0; r < kRowOut; ++r) dv[r] = drow[(col + r) * kTilePix];
#pragma unroll
        for (int q = 0; q < kRowOut + K - 1; ++q) uw[q] = urow[(col + q) * kTilePix];
#pragma unroll
        for (int j = 0; j < K; ++j)
#pragma unroll
          for (int r = 0; r < kRowOut; ++r) acc[j] += dv[r] * uw[r + j];
#pragma unroll
        for (int r = 0; r < kRowOut; ++r) db += dv[r];
      }
    }
    float* o = parts + (part * kTileC + cl) * (KK + 1);
#pragma unroll
    for (int j = 0; j < K; ++j) o[i * K + j] = acc[j];
    if (i == 0) o[KK] = db;
  }
  __syncthreads();
  for (int e = tid; e < kTileC * (KK + 1); e += nt) {
    const int ecl = e / (KK + 1), slot = e % (KK + 1);
    float s = 0.f;
    for (int part = 0; part < P; ++part) s += parts[(part * kTileC + ecl) * (KK + 1) + slot];
    if (c0 + ecl < C) ws[(static_cast<int64_t>(tile) * C + c0 + ecl) * NCOLS + slot] = s;
  }
  // (every thread has read u and parts once the next barrier passes: du may overwrite u)
  __syncthreads();

  // 4. du (into the u region), dx, and the input affine's sums
  float* dus = us;
  conv_rows<K, true>(dts, DWR, dus, g.tw, kTileC, g.th, g.tw, wt, 0.f);
  __syncthreads();
  float in_sums[2] = {0.f, 0.f};
  if (c_ok) {
    const ChannelAffine<float> af = in.of(c);
    T* dximg = dx + n * L.sN;
    const T* ximg = x + n * L.sN;
    for (int e = tid; e < g.th * g.tw * kTileC; e += nt) {
      const int q = e / kTileC, row = q / g.tw, col = q % g.tw, hh = h0 + row, ww = w0 + col;
      if (hh >= H || ww >= W) continue;
      float du = dus[e] + dys[((row + PR) * DW + col + PR) * kTileC + cl];
      const int off = c * static_cast<int>(L.sC) + (hh * W + ww) * static_cast<int>(L.sP);
      if (in.scale != nullptr) {
        in_sums[0] += du * (to_acc(ximg[off]) - af.ce);
        in_sums[1] += du;
        du *= af.sc;
      }
      dximg[off] = from_acc<T>(du);
    }
  }
  block_channel_sums<2>(in_sums, kTileC);
  if (tid < kTileC && c0 + tid < C) {
    ws[(static_cast<int64_t>(tile) * C + c0 + tid) * NCOLS + KK + 1] = in_sums[0];
    ws[(static_cast<int64_t>(tile) * C + c0 + tid) * NCOLS + KK + 2] = in_sums[1];
  }
}

// grid (channel groups of cpb, splits of tiles_per_split spatial tiles). Dynamic shared memory:
// u region [(th+2(k-1)) x (tw+2(k-1)) x cpb] and dt region [(th+k-1) x (tw+k-1) x cpb], fp32.
// Writes dx and ws[split][c][dw_grad_columns(k)] = partial (dw taps, db, din_scale, din_shift); the
// last two are sum du*(x - center) and sum du with the input affine, 0 without.
template <typename T, int ACT>
__global__ void dw_backward_generic_kernel(Layout L, int k, const T* __restrict__ x, InputAffine<acc_of<T>> in,
                                           const T* __restrict__ dy, const T* __restrict__ w, const T* __restrict__ b,
                                           const acc_of<T>* __restrict__ gamma, const acc_of<T>* __restrict__ mean,
                                           const acc_of<T>* __restrict__ rstd, const acc_of<T>* __restrict__ sums,
                                           acc_of<T> inv_m, bool batch_stats, int th, int tw, int cpb,
                                           int64_t tiles_per_split, T* __restrict__ dx, acc_of<T>* __restrict__ ws) {
  using A = acc_of<T>;
  CMK_DYNAMIC_SHARED(A, smem);
  const int kk = k * k, pl = (k - 1) / 2, pr = k - 1 - pl, ncols = static_cast<int>(dw_grad_columns(k));
  const int xh = th + 2 * (k - 1), xw = tw + 2 * (k - 1), dh = th + k - 1, dw = tw + k - 1;
  A* xs = smem;                   // u at rows h0-pr-pl .. , cols w0-pr-pl ..
  A* dts = smem + xh * xw * cpb;  // dt at rows h0-pr .. , cols w0-pr ..
  const int tid = threadIdx.x, nt = blockDim.x;
  const int64_t c0 = static_cast<int64_t>(blockIdx.x) * cpb;
  const int64_t tiles_w = ceil_div(L.W, tw), per_image = ceil_div(L.H, th) * tiles_w;
  const int64_t total = L.N * per_image;
  const int64_t t0 = blockIdx.y * tiles_per_split;
  const int64_t t1 = t0 + tiles_per_split < total ? t0 + tiles_per_split : total;
  const int nitems = cpb * (kk + 1);
  A acc[kMaxGradItems];
  for (int it = 0; it < kMaxGradItems; ++it) acc[it] = 0;
  // (sum du*(x - center), sum du) of this thread's channel lane: element e of step 3 has lane e % cpb = tid % cpb,
  // since blockDim.x is a multiple of 32 and cpb divides 32.
  A in_sums[2] = {0, 0};

  for (int64_t tile = t0; tile < t1; ++tile) {
    const int64_t n = tile / per_image, r = tile % per_image;
    const int64_t h0 = (r / tiles_w) * th, w0 = (r % tiles_w) * tw;
    // 1. u region, u = in.of(c)(x) (zero outside the image and past C)
    for (int e = tid; e < xh * xw * cpb; e += nt) {
      const int cl = e % cpb, q = e / cpb;
      const int64_t hh = h0 - pr - pl + q / xw, ww = w0 - pr - pl + q % xw, c = c0 + cl;
      xs[e] = (hh >= 0 && hh < L.H && ww >= 0 && ww < L.W && c < L.C)
                  ? in.of(c)(to_acc(x[elem_offset(L, n, c, hh * L.W + ww)]))
                  : A(0);
    }
    __syncthreads();
    // 2. dt on the tile plus its halo (zero outside the image)
    for (int e = tid; e < dh * dw * cpb; e += nt) {
      const int cl = e % cpb, q = e / cpb, row = q / dw, col = q % dw;
      const int64_t hh = h0 - pr + row, ww = w0 - pr + col, c = c0 + cl;
      A dt = 0;
      if (hh >= 0 && hh < L.H && ww >= 0 && ww < L.W && c < L.C) {
        A t = to_acc(b[c]);
        const T* wc = w + c * kk;
        for (int i = 0; i < k; ++i)
          for (int j = 0; j < k; ++j) t += to_acc(wc[i * k + j]) * xs[((row + i) * xw + col + j) * cpb + cl];
        const A rs = rstd[c], a = gamma[c] * rs;
        const A ghat = (act_forward<ACT>(t) - mean[c]) * rs - (batch_stats ? sums[c * 3 + 2] : A(0));
        const A c1 = batch_stats ? sums[c * 3] * inv_m : A(0), c2 = batch_stats ? sums[c * 3 + 1] * inv_m : A(0);
        const A d = to_acc(dy[elem_offset(L, n, c, hh * L.W + ww)]);
        dt = a * (d - c1 - ghat * c2) * act_backward<ACT>(t);
      }
      dts[e] = dt;
    }
    __syncthreads();
    // 3. du = dy + sum_{i,j} w[i,j] * dt[h-i+pl, w-j+pl];  dx = sc*du;  din_scale += du*(x - ce), din_shift += du
    for (int e = tid; e < th * tw * cpb; e += nt) {
      const int cl = e % cpb, q = e / cpb, row = q / tw, col = q % tw;
      const int64_t hh = h0 + row, ww = w0 + col, c = c0 + cl;
      if (hh < L.H && ww < L.W && c < L.C) {
        const int64_t off = elem_offset(L, n, c, hh * L.W + ww);
        A du = to_acc(dy[off]);
        const T* wc = w + c * kk;
        for (int i = 0; i < k; ++i)
          for (int j = 0; j < k; ++j)
            du += to_acc(wc[i * k + j]) * dts[((row + k - 1 - i) * dw + col + k - 1 - j) * cpb + cl];
        if (in.scale != nullptr) {
          in_sums[0] += du * (to_acc(x[off]) - in.center[c]);
          in_sums[1] += du;
          du *= in.scale[c];
        }
        dx[off] = from_acc<T>(du);
      }
    }
    // 4. per-(channel, tap) partials: dw[c,i,j] += sum dt[h,w] * u[h+i-pl, w+j-pl];  db[c] += sum dt
    for (int it = 0; it < kMaxGradItems; ++it) {
      const int item = tid + it * nt;
      if (item >= nitems) break;
      const int cl = item % cpb, slot = item / cpb;
      A s = 0;
      if (slot < kk) {
        const int i = slot / k, j = slot % k;
        for (int row = 0; row < th; ++row)
          for (int col = 0; col < tw; ++col)
            s += dts[((row + pr) * dw + col + pr) * cpb + cl] * xs[((row + pr + i) * xw + col + pr + j) * cpb + cl];
      } else {
        for (int row = 0; row < th; ++row)
          for (int col = 0; col < tw; ++col) s += dts[((row + pr) * dw + col + pr) * cpb + cl];
      }
      acc[it] += s;
    }
    __syncthreads();
  }
  A* ws_split = ws + static_cast<int64_t>(blockIdx.y) * L.C * ncols;
  for (int it = 0; it < kMaxGradItems; ++it) {
    const int item = tid + it * nt;
    if (item >= nitems) break;
    const int cl = item % cpb, slot = item / cpb;
    const int64_t c = c0 + cl;
    if (c < L.C) ws_split[c * ncols + slot] = acc[it];
  }
  block_channel_sums<2>(in_sums, cpb);
  if (tid < cpb && c0 + tid < L.C) {
    ws_split[(c0 + tid) * ncols + kk + 1] = in_sums[0];
    ws_split[(c0 + tid) * ncols + kk + 2] = in_sums[1];
  }
}

struct TilePlan {
  int cpb, th, tw;
  int64_t groups, splits, tiles_per_split;
  size_t smem_bytes;
};
// elem_bytes: the accumulation type's size. fp64 halves the channel lanes, so its tiles take the shared
// memory of fp32's.
TilePlan plan_tiles(const Problem& p, int64_t k, const LaunchShape& s, int elem_bytes) {
  TilePlan q;
  q.cpb = p.channels_last ? std::max(1, s.tile_channels * 4 / elem_bytes) : 1;
  q.th = s.tile_h;
  q.tw = s.tile_w;
  q.groups = ceil_div(p.C, q.cpb);
  const int64_t total = p.N * ceil_div(p.H, q.th) * ceil_div(p.W, q.tw);
  q.splits = std::max<int64_t>(1, std::min<int64_t>(s.max_splits, total));
  q.tiles_per_split = ceil_div(total, q.splits);
  q.splits = ceil_div(total, q.tiles_per_split);
  const int64_t xe = (q.th + 2 * (k - 1)) * (q.tw + 2 * (k - 1)), de = (q.th + k - 1) * (q.tw + k - 1);
  q.smem_bytes = static_cast<size_t>((xe + de) * q.cpb) * elem_bytes;
  if (q.cpb * (k * k + 1) > kMaxGradItems * s.threads)
    throw std::invalid_argument("convmixer_kernels: depthwise backward tile has more (channel, tap) items than "
                                "threads * kMaxGradItems; lower tile_channels");
  return q;
}


ConvTiling plan_conv_tiling(const Problem& p, const LaunchShape& s) {
  ConvTiling g;
  g.tw = static_cast<int>(std::min<int64_t>(ceil_div(p.W, kRowOut) * kRowOut, s.conv_tile_w));
  g.th = static_cast<int>(std::min<int64_t>(p.H, s.conv_tile_h));
  g.tiles_h = static_cast<int>(ceil_div(p.H, g.th));
  g.tiles_w = static_cast<int>(ceil_div(p.W, g.tw));
  return g;
}
// The tiled kernel covers k <= 9 with int32 offsets inside an image and (tiles, channel groups) on the grid.
bool use_conv_tiles(const Problem& p, int64_t k, const ConvTiling& g) {
  constexpr int64_t kInt32 = 2147483647;
  return k <= kMaxTiledK && p.C * p.H * p.W <= kInt32 && p.N * g.tiles_h * g.tiles_w <= kInt32 &&
         ceil_div(p.C, kTileC) <= 65535;
}
int64_t conv_tiles(const Problem& p, const ConvTiling& g) { return p.N * g.tiles_h * g.tiles_w; }
size_t conv_tile_smem_bytes(int64_t k, const ConvTiling& g) {
  // u with its halo (later dy in kReduce), t, (A, B)
  return static_cast<size_t>((g.th + k - 1) * (g.tw + k - 1) * kTilePix + g.th * g.tw * kTileC + 2 * kTileC) *
         sizeof(float);
}

// Dynamic shared memory above the default 48 KiB per block (static plus dynamic) needs an opt-in.
void allow_dynamic_smem(const void* kernel, size_t bytes, const char* name) {
#if defined(CMK_CUDA_EMULATION)
  (void)kernel, (void)bytes, (void)name;
#else
  cudaFuncAttributes fa;
  cudaError_t e = cudaFuncGetAttributes(&fa, kernel);
  if (e == cudaSuccess && bytes + fa.sharedSizeBytes > 48 * 1024)
    e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
  if (e != cudaSuccess)
    throw std::runtime_error(std::string("convmixer_kernels: shared memory setup of ") + name + " failed: " +
                             cudaGetErrorString(e));
#endif
}

template <typename F>
void dispatch_tiled_k(int64_t k, F&& f) {
  switch (k) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 5: f(std::integral_constant<int, 5>{}); break;
    case 6: f(std::integral_constant<int, 6>{}); break;
    case 7: f(std::integral_constant<int, 7>{}); break;
    case 8: f(std::integral_constant<int, 8>{}); break;
    case 9: f(std::integral_constant<int, 9>{}); break;
    default: throw std::invalid_argument("convmixer_kernels: the tiled depthwise kernel covers k <= 9");
  }
}

// One launch of dw_conv_tile_kernel<T, k, MODE>; ws receives conv_tiles(p, g) partials per channel
// (kStats, kReduce).
template <typename T, int MODE>
void launch_conv_tiles(const Problem& p, int64_t k, const LaunchShape& s, const ConvTiling& g, const T* x,
                       InputAffine<float> in, const T* w, const T* b, const float* gamma, const float* beta,
                       const float* mean, const float* rstd, const T* dy, T* y, float* ws, void* stream) {
  if (s.threads > kTileThreads || s.threads % kWarp != 0)
    throw std::invalid_argument("convmixer_kernels: the tiled depthwise kernel needs blockDim <= 256, a multiple of 32");
  const Layout L = make_layout(p);
  const auto aligned = [](const void* q) { return q == nullptr || reinterpret_cast<uintptr_t>(q) % 16 == 0; };
  const bool vec = p.channels_last && p.C % pack16<T>() == 0 && aligned(x) && aligned(y) && aligned(dy);
  const size_t smem = conv_tile_smem_bytes(k, g);
  const dim3 grid(static_cast<unsigned>(conv_tiles(p, g)), static_cast<unsigned>(ceil_div(p.C, kTileC)));
  dispatch_tiled_k(k, [&](auto kc) {
    auto kern = &dw_conv_tile_kernel<T, decltype(kc)::value, MODE>;
    allow_dynamic_smem(reinterpret_cast<const void*>(kern), smem, "dw_conv_tile_kernel");
    CMK_LAUNCH(kern, grid, dim3(s.threads), smem, stream, L, g, p.act, vec, x, in, w, b, gamma, beta, mean, rstd, dy,
               y, ws);
    CMK_CHECK_LAUNCH("dw_conv_tile_kernel");
  });
}

ConvTiling plan_backward_tiling(const Problem& p, const LaunchShape& s) {
  LaunchShape b = s;
  b.conv_tile_h = s.bwd_tile_h;
  b.conv_tile_w = s.bwd_tile_w;
  return plan_conv_tiling(p, b);
}
size_t backward_tile_smem_bytes(int64_t k, const ConvTiling& g, int threads) {
  const int64_t dh = g.th + k - 1, dw = g.tw + k - 1, dwr = ceil_div(dw, kRowOut) * kRowOut;
  const int64_t floats = (dh + k - 1) * (dwr + k - 1) * kTilePix + dh * dwr * kTilePix + dh * dw * kTileC +
                         tile_grad_parts(static_cast<int>(k), threads) * kTileC * (k * k + 1);
  return static_cast<size_t>(floats) * sizeof(float);
}

template <typename T>
void launch_backward_tiles(const Problem& p, int64_t k, const LaunchShape& s, const ConvTiling& g, const T* x,
                           InputAffine<float> in, const T* dy, const T* w, const T* b, const float* gamma, const float* mean,
                           const float* rstd, const float* sums, float inv_m, bool batch_stats, T* dx, float* ws,
                           void* stream) {
  if (s.threads > kTileThreads || s.threads % kWarp != 0)
    throw std::invalid_argument("convmixer_kernels: the tiled depthwise kernel needs blockDim <= 256, a multiple of 32");
  const Layout L = make_layout(p);
  const auto aligned = [](const void* q) { return reinterpret_cast<uintptr_t>(q) % 16 == 0; };
  const bool vec = p.channels_last && p.C % pack16<T>() == 0 && aligned(x) && aligned(dy);
  const size_t smem = backward_tile_smem_bytes(k, g, s.threads);
  const dim3 grid(static_cast<unsigned>(conv_tiles(p, g)), static_cast<unsigned>(ceil_div(p.C, kTileC)));
  dispatch_tiled_k(k, [&](auto kc) {
    auto kern = &dw_backward_tile_kernel<T, decltype(kc)::value>;
    allow_dynamic_smem(reinterpret_cast<const void*>(kern), smem, "dw_backward_tile_kernel");
    CMK_LAUNCH(kern, grid, dim3(s.threads), smem, stream, L, g, p.act, x, in, dy, w, b, gamma, mean, rstd, sums, inv_m,
               batch_stats, vec, dx, ws);
    CMK_CHECK_LAUNCH("dw_backward_tile_kernel");
  });
}

}  // namespace

template <typename A>
int64_t DwBlockLaunch<A>::workspace_elems(const Problem& p, int64_t k, const LaunchShape& s) {
  const SplitPlan sp = plan_splits(p, s);
  const TilePlan tp = plan_tiles(p, k, s, sizeof(A));
  const int64_t generic = std::max<int64_t>(sp.splits * p.C * 3, tp.splits * p.C * dw_grad_columns(k));
  if (std::is_same<A, double>::value) return generic;  // no tiled kernels
  const int64_t conv = (conv_tiles(p, plan_conv_tiling(p, s)) * 3 + 1) * p.C;  // tiled partials + shift
  const int64_t bwd = conv_tiles(p, plan_backward_tiling(p, s)) * p.C * dw_grad_columns(k);
  return std::max<int64_t>({generic, conv, bwd});
}

template <typename A>
void DwBlockLaunch<A>::forward(const Problem& p, int64_t k, const LaunchShape& s, const void* x, const A* in_center,
                               const A* in_scale, const A* in_shift, const void* w, const void* b, const A* gamma,
                               const A* beta, A* mean, A* rstd, A* var, bool batch_stats, bool apply, A eps, void* y,
                               A* ws, void* stream) {
  const Layout L = make_layout(p);
  const int ki = static_cast<int>(k);
  const InputAffine<A> in{in_center, in_scale, in_shift};
  dispatch_dtype_act<A>(p.dtype, p.act, [&](auto tag, auto act) {
    using T = typename decltype(tag)::type;
    constexpr int ACT = decltype(act)::value;
    const T* xp = static_cast<const T*>(x);
    const T* wp = static_cast<const T*>(w);
    const T* bp = static_cast<const T*>(b);
    T* yp = static_cast<T*>(y);
    if constexpr (has_tiled_kernels<T>()) {
      const ConvTiling g = plan_conv_tiling(p, s);
      if (use_conv_tiles(p, k, g)) {
        if (batch_stats) {
          launch_conv_tiles<T, kStats>(p, k, s, g, xp, in, wp, bp, nullptr, nullptr, nullptr, nullptr, nullptr,
                                       nullptr, ws, stream);
          launch_welford_finalize(ws, conv_tiles(p, g), p.C, eps, mean, var, rstd, stream,
                                  static_cast<const A*>(ws + conv_tiles(p, g) * p.C * 3));
        }
        if (apply)
          launch_conv_tiles<T, kApply>(p, k, s, g, xp, in, wp, bp, gamma, beta, mean, rstd, nullptr, yp, nullptr,
                                       stream);
        return;
      }
    }
    if (batch_stats) {
      const SplitPlan sp = plan_splits(p, s);
      auto kern = &dw_stats_generic_kernel<T, ACT>;
      CMK_LAUNCH(kern, dim3(static_cast<unsigned>(sp.groups), static_cast<unsigned>(sp.splits)), dim3(s.threads), 0,
                 stream, L, ki, xp, in, wp, bp, sp.cpb, sp.chunk, ws);
      CMK_CHECK_LAUNCH("dw_stats_generic_kernel");
      launch_welford_finalize<A>(ws, sp.splits, p.C, eps, mean, var, rstd, stream);
    }
    if (!apply) return;  // synchronized BN: applied later with the global statistics
    constexpr int V = pack16<T>();
    const bool vec = p.channels_last && p.C % V == 0 && reinterpret_cast<uintptr_t>(x) % 16 == 0 &&
                     reinterpret_cast<uintptr_t>(y) % 16 == 0;
    const int64_t items = vec ? p.N * p.H * p.W * (p.C / V) : p.N * p.C * p.H * p.W;
    const unsigned blocks = static_cast<unsigned>(
        std::max<int64_t>(1, std::min<int64_t>(s.elementwise_blocks, ceil_div(items, s.threads))));
    if (vec) {
      auto kern = &dw_apply_generic_kernel<T, ACT, true, V>;
      CMK_LAUNCH(kern, dim3(blocks), dim3(s.threads), 0, stream, L, ki, xp, in, wp, bp, gamma, beta, mean, rstd, yp,
                 items);
    } else if (p.channels_last) {
      auto kern = &dw_apply_generic_kernel<T, ACT, true, 1>;
      CMK_LAUNCH(kern, dim3(blocks), dim3(s.threads), 0, stream, L, ki, xp, in, wp, bp, gamma, beta, mean, rstd, yp,
                 items);
    } else {
      auto kern = &dw_apply_generic_kernel<T, ACT, false, 1>;
      CMK_LAUNCH(kern, dim3(blocks), dim3(s.threads), 0, stream, L, ki, xp, in, wp, bp, gamma, beta, mean, rstd, yp,
                 items);
    }
    CMK_CHECK_LAUNCH("dw_apply_generic_kernel");
  });
}

template <typename A>
void DwBlockLaunch<A>::backward(const Problem& p, int64_t k, const LaunchShape& s, const void* dy, const void* x,
                                const A* in_center, const A* in_scale, const A* in_shift, const void* w, const void* b,
                                const A* gamma, const A* mean, const A* rstd, bool batch_stats, bool sums_given,
                                bool reduce_only, void* dx, A* sums, A* grads, A* ws, void* stream) {
  const Layout L = make_layout(p);
  const int ki = static_cast<int>(k);
  const InputAffine<A> in{in_center, in_scale, in_shift};
  dispatch_dtype_act<A>(p.dtype, p.act, [&](auto tag, auto act) {
    using T = typename decltype(tag)::type;
    constexpr int ACT = decltype(act)::value;
    constexpr bool tiled_kernels = has_tiled_kernels<T>();
    const T* dyp = static_cast<const T*>(dy);
    const T* xp = static_cast<const T*>(x);
    const T* wp = static_cast<const T*>(w);
    const T* bp = static_cast<const T*>(b);
    // Pass 1: sum dy, sum dy*ghat per channel (dbeta, dgamma; and the training terms of dg). A
    // synchronized BN gives the global means instead (sums_given: c1, c2 = sums, so inv_m = 1).
    if (!sums_given) {
      const ConvTiling g = plan_conv_tiling(p, s);
      bool done = false;
      if constexpr (tiled_kernels) {
        if (use_conv_tiles(p, k, g)) {
          launch_conv_tiles<T, kReduce>(p, k, s, g, xp, in, wp, bp, nullptr, nullptr, mean, rstd, dyp, nullptr, ws,
                                        stream);
          launch_sum_splits<A>(ws, conv_tiles(p, g), p.C * 3, sums, stream);
          done = true;
        }
      }
      if (!done) {
        const SplitPlan sp = plan_splits(p, s);
        auto reduce = &dw_backward_reduce_generic_kernel<T, ACT>;
        CMK_LAUNCH(reduce, dim3(static_cast<unsigned>(sp.groups), static_cast<unsigned>(sp.splits)), dim3(s.threads),
                   0, stream, L, ki, dyp, xp, in, wp, bp, mean, rstd, sp.cpb, sp.chunk, ws);
        CMK_CHECK_LAUNCH("dw_backward_reduce_generic_kernel");
        launch_sum_splits<A>(ws, sp.splits, p.C * 3, sums, stream);
      }
    }
    if (reduce_only) return;
    const A inv_m = sums_given ? A(1) : A(1) / static_cast<A>(L.N * L.HW);
    if (batch_stats && !sums_given) launch_recentre_sums<A>(sums, p.C, inv_m, stream);
    // Pass 2: dt, du, dx, and the dw/db/din_scale/din_shift partials on shared-memory tiles.
    if constexpr (tiled_kernels) {
      const ConvTiling bg = plan_backward_tiling(p, s);
      if (use_conv_tiles(p, k, bg)) {
        launch_backward_tiles<T>(p, k, s, bg, xp, in, dyp, wp, bp, gamma, mean, rstd, sums, inv_m, batch_stats,
                                 static_cast<T*>(dx), ws, stream);
        launch_sum_splits<A>(ws, conv_tiles(p, bg), p.C * dw_grad_columns(k), grads, stream);
        return;
      }
    }
    const TilePlan tp = plan_tiles(p, k, s, sizeof(A));
    auto tile = &dw_backward_generic_kernel<T, ACT>;
    allow_dynamic_smem(reinterpret_cast<const void*>(tile), tp.smem_bytes, "dw_backward_generic_kernel");
    CMK_LAUNCH(tile, dim3(static_cast<unsigned>(tp.groups), static_cast<unsigned>(tp.splits)), dim3(s.threads),
               tp.smem_bytes, stream, L, ki, xp, in, dyp, wp, bp, gamma, mean, rstd, static_cast<const A*>(sums),
               inv_m, batch_stats, tp.th, tp.tw, tp.cpb, tp.tiles_per_split, static_cast<T*>(dx), ws);
    CMK_CHECK_LAUNCH("dw_backward_generic_kernel");
    launch_sum_splits<A>(ws, tp.splits, p.C * dw_grad_columns(k), grads, stream);
  });
}

template struct DwBlockLaunch<float>;
template struct DwBlockLaunch<double>;

}  // namespace CMK_KNS
}  // namespace cmk
