// Fused depthwise block on the GPU:  y = u + gamma * (act(dwconv_k(u) + b) - mean) * rstd + beta, where
// u = in_scale[c]*x + in_shift[c] (the previous pointwise block's BN apply folded into this block's
// loads, DESIGN.md section 3) or u = x without an input affine. DESIGN.md section 3 is the
// specification; the formulas come from ../common/block_math.h.
//
// Kernels (fp32 accumulation for fp32/fp16/bf16; int64 offsets; NCHW and channels_last):
//   dw_stats_partial_kernel   training pass 1: t = conv(u) + b, g = act(t), per-thread Welford, merged
//                             over the block (warp xor shuffles + shared memory) into a per-split
//                             partial (count, mean, M2); welford_finalize_kernel merges the splits
//                             with Chan's rule -> batch mean, var, rstd.
//   dw_apply_kernel           eval (the only pass) and training pass 2: recomputes t, y = u + A*g + B.
//                             channels_last with C % 8|4 == 0 moves 16-byte packs of channels.
//   dw_backward_reduce_kernel backward pass 1: recomputes t, sums dy and dy*ghat per channel.
//   dw_backward_tile_kernel   backward pass 2 on spatial tiles in shared memory: u tile with a double
//                             halo -> t, dt on the tile plus a halo -> du = dy + conv_transpose(dt),
//                             dx = in_scale*du; per-(channel, tap) partials of dw and db accumulated
//                             across the tiles a block owns, and per-channel sums of du*x and du
//                             (din_scale, din_shift); sum_splits_kernel adds the blocks' partials.
// Every read of x goes through the input affine (in-bounds elements only: the zero padding is of u).
// Launches go on the caller's stream and are checked. Under CMK_CUDA_EMULATION this file compiles as
// host C++ against ../cuda_emu/cuda_emu.h (csrc/cuda_emu/dw_block_emu.cpp).
#include "cuda_common.cuh"

namespace cmk {
namespace CMK_KNS {
namespace {

constexpr int kMaxGradItems = 8;  // (channel, tap) accumulators per thread in the backward tile kernel

// The block's input u = scale[c]*x + shift[c], in fp32 and not rounded: the previous pointwise block's
// BN apply, folded into this block's loads. Null pointers (no input affine): scale 1, shift 0, u = x.
struct InputAffine {
  const float* scale;
  const float* shift;
  CMK_DEV float scale_of(int64_t c) const { return scale != nullptr ? scale[c] : 1.f; }
  CMK_DEV float shift_of(int64_t c) const { return shift != nullptr ? shift[c] : 0.f; }
};

// t = b + sum_{i,j} w[c,i,j] * u[n, c, h+i-pl, w+j-pl] with u = sc*x + sh read from global memory
// (zero padding of u).
template <typename T>
CMK_DEV float conv_at(const Layout& L, int k, const T* __restrict__ x, float sc, float sh, const T* __restrict__ w,
                      float bias, int64_t n, int64_t c, int64_t h, int64_t wc) {
  const int pl = (k - 1) / 2;
  const T* wrow = w + c * k * k;
  float acc = bias;
  for (int i = 0; i < k; ++i) {
    const int64_t hh = h + i - pl;
    if (hh < 0 || hh >= L.H) continue;
    for (int j = 0; j < k; ++j) {
      const int64_t ww = wc + j - pl;
      if (ww < 0 || ww >= L.W) continue;
      acc += to_acc(wrow[i * k + j]) * (sc * to_acc(x[elem_offset(L, n, c, hh * L.W + ww)]) + sh);
    }
  }
  return acc;
}

// grid (channel groups, splits); writes ws[split][c][3] = (count, mean, M2) of act(t).
template <typename T, int ACT>
__global__ void dw_stats_partial_kernel(Layout L, int k, const T* __restrict__ x, InputAffine in,
                                        const T* __restrict__ w, const T* __restrict__ b, int cpb, int64_t chunk,
                                        float* __restrict__ ws) {
  const int tid = threadIdx.x, lane_c = tid % cpb;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * cpb + lane_c;
  const int64_t M = L.N * L.HW, m0 = blockIdx.y * chunk, m1 = m0 + chunk < M ? m0 + chunk : M;
  Welford<float> acc;
  if (c < L.C) {
    const float bc = to_acc(b[c]), sc = in.scale_of(c), sh = in.shift_of(c);
    for (int64_t m = m0 + tid / cpb; m < m1; m += blockDim.x / cpb) {
      const int64_t n = m / L.HW, pix = m % L.HW;
      const float t = conv_at(L, k, x, sc, sh, w, bc, n, c, pix / L.W, pix % L.W);
      acc.merge(1.f, act_forward<ACT>(t), 0.f);
    }
  }
  block_channel_welford(acc, cpb);
  if (tid < cpb && c < L.C) {
    float* o = ws + (static_cast<int64_t>(blockIdx.y) * L.C + c) * 3;
    o[0] = acc.count;
    o[1] = acc.mean;
    o[2] = acc.m2;
  }
}

// Grid-stride over items: NCHW one element each; channels_last VEC consecutive channels of a pixel.
// u = sc*x + sh on every tap and on the residual.
template <typename T, int ACT, bool CL, int VEC>
__global__ void dw_apply_kernel(Layout L, int k, const T* __restrict__ x, InputAffine in, const T* __restrict__ w,
                                const T* __restrict__ b, const float* __restrict__ gamma,
                                const float* __restrict__ beta, const float* __restrict__ mean,
                                const float* __restrict__ rstd, T* __restrict__ y, int64_t items) {
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
    float acc[VEC], sc[VEC], sh[VEC];
    for (int v = 0; v < VEC; ++v) {
      acc[v] = to_acc(b[c0 + v]);
      sc[v] = in.scale_of(c0 + v);
      sh[v] = in.shift_of(c0 + v);
    }
    for (int i = 0; i < k; ++i) {
      const int64_t hh = h + i - pl;
      if (hh < 0 || hh >= L.H) continue;
      for (int j = 0; j < k; ++j) {
        const int64_t ww = wc + j - pl;
        if (ww < 0 || ww >= L.W) continue;
        const P xv = *reinterpret_cast<const P*>(x + elem_offset(L, n, c0, hh * L.W + ww));
        for (int v = 0; v < VEC; ++v)
          acc[v] += to_acc(w[(c0 + v) * kk + i * k + j]) * (sc[v] * to_acc(xv.v[v]) + sh[v]);
      }
    }
    const int64_t off = elem_offset(L, n, c0, pix);
    const P xc = *reinterpret_cast<const P*>(x + off);
    P out;
    for (int v = 0; v < VEC; ++v) {
      const int64_t c = c0 + v;
      const float a = gamma[c] * rstd[c];
      const float u = sc[v] * to_acc(xc.v[v]) + sh[v];
      out.v[v] = from_acc<T>(u + a * act_forward<ACT>(acc[v]) + (beta[c] - mean[c] * a));
    }
    *reinterpret_cast<P*>(y + off) = out;
  }
}

// grid (channel groups, splits); ws[split][c][2] = (sum dy, sum dy*ghat).
template <typename T, int ACT>
__global__ void dw_backward_reduce_kernel(Layout L, int k, const T* __restrict__ dy, const T* __restrict__ x,
                                          InputAffine in, const T* __restrict__ w, const T* __restrict__ b,
                                          const float* __restrict__ mean, const float* __restrict__ rstd, int cpb,
                                          int64_t chunk, float* __restrict__ ws) {
  const int tid = threadIdx.x, lane_c = tid % cpb;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * cpb + lane_c;
  const int64_t M = L.N * L.HW, m0 = blockIdx.y * chunk, m1 = m0 + chunk < M ? m0 + chunk : M;
  float s[2] = {0.f, 0.f};
  if (c < L.C) {
    const float bc = to_acc(b[c]), mu = mean[c], rs = rstd[c], sc = in.scale_of(c), sh = in.shift_of(c);
    for (int64_t m = m0 + tid / cpb; m < m1; m += blockDim.x / cpb) {
      const int64_t n = m / L.HW, pix = m % L.HW;
      const float t = conv_at(L, k, x, sc, sh, w, bc, n, c, pix / L.W, pix % L.W);
      const float d = to_acc(dy[elem_offset(L, n, c, pix)]);
      s[0] += d;
      s[1] += d * ((act_forward<ACT>(t) - mu) * rs);
    }
  }
  block_channel_sums<2>(s, cpb);
  if (tid < cpb && c < L.C) {
    float* o = ws + (static_cast<int64_t>(blockIdx.y) * L.C + c) * 2;
    o[0] = s[0];
    o[1] = s[1];
  }
}

// grid (channel groups of cpb, splits of tiles_per_split spatial tiles). Dynamic shared memory:
// u region [(th+2(k-1)) x (tw+2(k-1)) x cpb] and dt region [(th+k-1) x (tw+k-1) x cpb], fp32.
// Writes dx and ws[split][c][dw_grad_columns(k)] = partial (dw taps, db, din_scale, din_shift); the
// last two are sum du*x and sum du with the input affine, 0 without.
template <typename T, int ACT>
__global__ void dw_backward_tile_kernel(Layout L, int k, const T* __restrict__ x, InputAffine in,
                                        const T* __restrict__ dy, const T* __restrict__ w, const T* __restrict__ b,
                                        const float* __restrict__ gamma, const float* __restrict__ mean,
                                        const float* __restrict__ rstd, const float* __restrict__ sums,
                                        float inv_m, bool batch_stats, int th, int tw, int cpb, int64_t tiles_per_split,
                                        T* __restrict__ dx, float* __restrict__ ws) {
  CMK_DYNAMIC_SHARED(float, smem);
  const int kk = k * k, pl = (k - 1) / 2, pr = k - 1 - pl, ncols = static_cast<int>(dw_grad_columns(k));
  const int xh = th + 2 * (k - 1), xw = tw + 2 * (k - 1), dh = th + k - 1, dw = tw + k - 1;
  float* xs = smem;                 // u at rows h0-pr-pl .. , cols w0-pr-pl ..
  float* dts = smem + xh * xw * cpb;  // dt at rows h0-pr .. , cols w0-pr ..
  const int tid = threadIdx.x, nt = blockDim.x;
  const int64_t c0 = static_cast<int64_t>(blockIdx.x) * cpb;
  const int64_t tiles_w = ceil_div(L.W, tw), per_image = ceil_div(L.H, th) * tiles_w;
  const int64_t total = L.N * per_image;
  const int64_t t0 = blockIdx.y * tiles_per_split;
  const int64_t t1 = t0 + tiles_per_split < total ? t0 + tiles_per_split : total;
  const int nitems = cpb * (kk + 1);
  float acc[kMaxGradItems];
  for (int it = 0; it < kMaxGradItems; ++it) acc[it] = 0.f;
  // (sum du*x, sum du) of this thread's channel lane: element e of step 3 has lane e % cpb = tid % cpb,
  // since blockDim.x is a multiple of 32 and cpb divides 32.
  float in_sums[2] = {0.f, 0.f};

  for (int64_t tile = t0; tile < t1; ++tile) {
    const int64_t n = tile / per_image, r = tile % per_image;
    const int64_t h0 = (r / tiles_w) * th, w0 = (r % tiles_w) * tw;
    // 1. u region, u = sc*x + sh (zero outside the image and past C)
    for (int e = tid; e < xh * xw * cpb; e += nt) {
      const int cl = e % cpb, q = e / cpb;
      const int64_t hh = h0 - pr - pl + q / xw, ww = w0 - pr - pl + q % xw, c = c0 + cl;
      xs[e] = (hh >= 0 && hh < L.H && ww >= 0 && ww < L.W && c < L.C)
                  ? in.scale_of(c) * to_acc(x[elem_offset(L, n, c, hh * L.W + ww)]) + in.shift_of(c)
                  : 0.f;
    }
    __syncthreads();
    // 2. dt on the tile plus its halo (zero outside the image)
    for (int e = tid; e < dh * dw * cpb; e += nt) {
      const int cl = e % cpb, q = e / cpb, row = q / dw, col = q % dw;
      const int64_t hh = h0 - pr + row, ww = w0 - pr + col, c = c0 + cl;
      float dt = 0.f;
      if (hh >= 0 && hh < L.H && ww >= 0 && ww < L.W && c < L.C) {
        float t = to_acc(b[c]);
        const T* wc = w + c * kk;
        for (int i = 0; i < k; ++i)
          for (int j = 0; j < k; ++j) t += to_acc(wc[i * k + j]) * xs[((row + i) * xw + col + j) * cpb + cl];
        const float rs = rstd[c], a = gamma[c] * rs;
        const float ghat = (act_forward<ACT>(t) - mean[c]) * rs;
        const float c1 = batch_stats ? sums[c * 2] * inv_m : 0.f, c2 = batch_stats ? sums[c * 2 + 1] * inv_m : 0.f;
        const float d = to_acc(dy[elem_offset(L, n, c, hh * L.W + ww)]);
        dt = a * (d - c1 - ghat * c2) * act_backward<ACT>(t);
      }
      dts[e] = dt;
    }
    __syncthreads();
    // 3. du = dy + sum_{i,j} w[i,j] * dt[h-i+pl, w-j+pl];  dx = sc*du;  din_scale += du*x, din_shift += du
    for (int e = tid; e < th * tw * cpb; e += nt) {
      const int cl = e % cpb, q = e / cpb, row = q / tw, col = q % tw;
      const int64_t hh = h0 + row, ww = w0 + col, c = c0 + cl;
      if (hh < L.H && ww < L.W && c < L.C) {
        const int64_t off = elem_offset(L, n, c, hh * L.W + ww);
        float du = to_acc(dy[off]);
        const T* wc = w + c * kk;
        for (int i = 0; i < k; ++i)
          for (int j = 0; j < k; ++j)
            du += to_acc(wc[i * k + j]) * dts[((row + k - 1 - i) * dw + col + k - 1 - j) * cpb + cl];
        if (in.scale != nullptr) {
          in_sums[0] += du * to_acc(x[off]);
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
      float s = 0.f;
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
  float* ws_split = ws + static_cast<int64_t>(blockIdx.y) * L.C * ncols;
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
TilePlan plan_tiles(const Problem& p, int64_t k, const LaunchShape& s) {
  TilePlan q;
  q.cpb = p.channels_last ? s.tile_channels : 1;
  q.th = s.tile_h;
  q.tw = s.tile_w;
  q.groups = ceil_div(p.C, q.cpb);
  const int64_t total = p.N * ceil_div(p.H, q.th) * ceil_div(p.W, q.tw);
  q.splits = std::max<int64_t>(1, std::min<int64_t>(s.max_splits, total));
  q.tiles_per_split = ceil_div(total, q.splits);
  q.splits = ceil_div(total, q.tiles_per_split);
  const int64_t xe = (q.th + 2 * (k - 1)) * (q.tw + 2 * (k - 1)), de = (q.th + k - 1) * (q.tw + k - 1);
  q.smem_bytes = static_cast<size_t>((xe + de) * q.cpb) * sizeof(float);
  if (q.cpb * (k * k + 1) > kMaxGradItems * s.threads)
    throw std::invalid_argument("convmixer_kernels: depthwise backward tile has more (channel, tap) items than "
                                "threads * kMaxGradItems; lower tile_channels");
  return q;
}

}  // namespace

int64_t dw_block_workspace_floats(const Problem& p, int64_t k, const LaunchShape& s) {
  const SplitPlan sp = plan_splits(p, s);
  const TilePlan tp = plan_tiles(p, k, s);
  return std::max<int64_t>(sp.splits * p.C * 3, tp.splits * p.C * dw_grad_columns(k));
}

void dw_block_forward_launch(const Problem& p, int64_t k, const LaunchShape& s, const void* x, const float* in_scale,
                             const float* in_shift, const void* w, const void* b, const float* gamma,
                             const float* beta, float* mean, float* rstd, float* var, bool batch_stats, bool apply,
                             float eps, void* y, float* ws, void* stream) {
  const Layout L = make_layout(p);
  const int ki = static_cast<int>(k);
  const InputAffine in{in_scale, in_shift};
  dispatch_dtype_act(p.dtype, p.act, [&](auto tag, auto act) {
    using T = typename decltype(tag)::type;
    constexpr int A = decltype(act)::value;
    const T* xp = static_cast<const T*>(x);
    const T* wp = static_cast<const T*>(w);
    const T* bp = static_cast<const T*>(b);
    T* yp = static_cast<T*>(y);
    if (batch_stats) {
      const SplitPlan sp = plan_splits(p, s);
      auto kern = &dw_stats_partial_kernel<T, A>;
      CMK_LAUNCH(kern, dim3(static_cast<unsigned>(sp.groups), static_cast<unsigned>(sp.splits)), dim3(s.threads), 0,
                 stream, L, ki, xp, in, wp, bp, sp.cpb, sp.chunk, ws);
      CMK_CHECK_LAUNCH("dw_stats_partial_kernel");
      launch_welford_finalize(ws, sp.splits, p.C, eps, mean, var, rstd, stream);
    }
    if (!apply) return;  // synchronized BN: applied later with the global statistics
    constexpr int V = pack16<T>();
    const bool vec = p.channels_last && p.C % V == 0 && reinterpret_cast<uintptr_t>(x) % 16 == 0 &&
                     reinterpret_cast<uintptr_t>(y) % 16 == 0;
    const int64_t items = vec ? p.N * p.H * p.W * (p.C / V) : p.N * p.C * p.H * p.W;
    const unsigned blocks = static_cast<unsigned>(
        std::max<int64_t>(1, std::min<int64_t>(s.elementwise_blocks, ceil_div(items, s.threads))));
    if (vec) {
      auto kern = &dw_apply_kernel<T, A, true, V>;
      CMK_LAUNCH(kern, dim3(blocks), dim3(s.threads), 0, stream, L, ki, xp, in, wp, bp, gamma, beta, mean, rstd, yp,
                 items);
    } else if (p.channels_last) {
      auto kern = &dw_apply_kernel<T, A, true, 1>;
      CMK_LAUNCH(kern, dim3(blocks), dim3(s.threads), 0, stream, L, ki, xp, in, wp, bp, gamma, beta, mean, rstd, yp,
                 items);
    } else {
      auto kern = &dw_apply_kernel<T, A, false, 1>;
      CMK_LAUNCH(kern, dim3(blocks), dim3(s.threads), 0, stream, L, ki, xp, in, wp, bp, gamma, beta, mean, rstd, yp,
                 items);
    }
    CMK_CHECK_LAUNCH("dw_apply_kernel");
  });
}

void dw_block_backward_launch(const Problem& p, int64_t k, const LaunchShape& s, const void* dy, const void* x,
                              const float* in_scale, const float* in_shift, const void* w, const void* b,
                              const float* gamma, const float* mean, const float* rstd, bool batch_stats,
                              bool sums_given, bool reduce_only, void* dx, float* sums, float* grads, float* ws,
                              void* stream) {
  const Layout L = make_layout(p);
  const int ki = static_cast<int>(k);
  const InputAffine in{in_scale, in_shift};
  dispatch_dtype_act(p.dtype, p.act, [&](auto tag, auto act) {
    using T = typename decltype(tag)::type;
    constexpr int A = decltype(act)::value;
    const T* dyp = static_cast<const T*>(dy);
    const T* xp = static_cast<const T*>(x);
    const T* wp = static_cast<const T*>(w);
    const T* bp = static_cast<const T*>(b);
    // Pass 1: sum dy, sum dy*ghat per channel (dbeta, dgamma; and the training terms of dg). A
    // synchronized BN gives the global means instead (sums_given: c1, c2 = sums, so inv_m = 1).
    if (!sums_given) {
      const SplitPlan sp = plan_splits(p, s);
      auto reduce = &dw_backward_reduce_kernel<T, A>;
      CMK_LAUNCH(reduce, dim3(static_cast<unsigned>(sp.groups), static_cast<unsigned>(sp.splits)), dim3(s.threads), 0,
                 stream, L, ki, dyp, xp, in, wp, bp, mean, rstd, sp.cpb, sp.chunk, ws);
      CMK_CHECK_LAUNCH("dw_backward_reduce_kernel");
      launch_sum_splits(ws, sp.splits, p.C * 2, sums, stream);
    }
    if (reduce_only) return;
    const float inv_m = sums_given ? 1.f : 1.f / static_cast<float>(L.N * L.HW);
    // Pass 2: dt, du, dx, and the dw/db/din_scale/din_shift partials on shared-memory tiles.
    const TilePlan tp = plan_tiles(p, k, s);
    auto tile = &dw_backward_tile_kernel<T, A>;
#if !defined(CMK_CUDA_EMULATION)
    // The default 48 KiB per block covers static (block_channel_sums) plus dynamic shared memory.
    cudaFuncAttributes fa;
    cudaError_t e = cudaFuncGetAttributes(&fa, reinterpret_cast<const void*>(tile));
    if (e == cudaSuccess && tp.smem_bytes + fa.sharedSizeBytes > 48 * 1024)
      e = cudaFuncSetAttribute(reinterpret_cast<const void*>(tile), cudaFuncAttributeMaxDynamicSharedMemorySize,
                               static_cast<int>(tp.smem_bytes));
    if (e != cudaSuccess)
      throw std::runtime_error(std::string("convmixer_kernels: shared memory setup of dw_backward_tile_kernel "
                                           "failed: ") + cudaGetErrorString(e));
#endif
    CMK_LAUNCH(tile, dim3(static_cast<unsigned>(tp.groups), static_cast<unsigned>(tp.splits)), dim3(s.threads),
               tp.smem_bytes, stream, L, ki, xp, in, dyp, wp, bp, gamma, mean, rstd, static_cast<const float*>(sums),
               inv_m, batch_stats, tp.th, tp.tw, tp.cpb, tp.tiles_per_split, static_cast<T*>(dx), ws);
    CMK_CHECK_LAUNCH("dw_backward_tile_kernel");
    launch_sum_splits(ws, tp.splits, p.C * dw_grad_columns(k), grads, stream);
  });
}

}  // namespace CMK_KNS
}  // namespace cmk
