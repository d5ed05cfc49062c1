// Fused conv -> act -> BatchNorm epilogue for the pointwise (1x1) conv and the patch stem on the GPU.
// The GEMM itself (T = Z @ W^T and the backward dW = dT^T Z, dZ = dT W) runs through at::matmul in
// conv_act_bn_launch.cpp; this file holds the per-channel work around it (DESIGN.md section 3):
//   cab_stats_partial_kernel    training pass 1: t = T + b written back into T, per-thread Welford of
//                               act(t), block merge by warp shuffles, per-split partials;
//                               welford_finalize_kernel -> batch mean, var, rstd.
//   cab_apply_kernel            y = gamma*(act(t) - mean)*rstd + beta (eval: t = T + b), t saved in the
//                               input dtype when asked; y = act(t) when the BN apply is deferred to the
//                               next depthwise block's load (apply_bn false; in training the statistics
//                               kernel writes it and this pass is skipped).
//   cab_backward_reduce_kernel  backward pass 1: sum dy, sum dy*ghat, sum ghat per channel (BN applied here
//                               only); in training launch_recentre_sums then centres ghat on the exact mean.
//   cab_backward_dt_kernel      backward pass 2: dT = dg * act'(t) in the input dtype, sum dT per channel.
// t is read from the saved tensor, or recomputed as T_acc + b rounded to the input dtype (as saved).
#include "cuda_common.cuh"

namespace cmk {
namespace CMK_KNS {
namespace {

// The activation input at element offset e of channel c: the saved t, or T_acc + b rounded to T.
template <typename T>
CMK_DEV float load_t(const T* __restrict__ t_saved, const float* __restrict__ T_acc, float bias, int64_t e) {
  return t_saved != nullptr ? to_acc(t_saved[e]) : to_acc(from_acc<T>(T_acc[e] + bias));
}

// With g_out (the BN apply deferred to the next depthwise block) it also writes y = g = act(t), and
// t in the input dtype to t_out when given, so no apply pass follows; the moments are then those of
// the stored (rounded) g, which the next block normalizes (csrc/cpu/conv_act_bn.cpp stats_pass).
template <typename T, int ACT>
__global__ void cab_stats_partial_kernel(Layout L, float* __restrict__ Tm, const T* __restrict__ b, int cpb,
                                         int64_t chunk, float* __restrict__ ws, T* __restrict__ g_out,
                                         T* __restrict__ t_out) {
  const int tid = threadIdx.x, lane_c = tid % cpb;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * cpb + lane_c;
  const int64_t M = L.N * L.HW, m0 = blockIdx.y * chunk, m1 = m0 + chunk < M ? m0 + chunk : M;
  Welford<float> acc;
  if (c < L.C) {
    const float bc = to_acc(b[c]);
    for (int64_t m = m0 + tid / cpb; m < m1; m += blockDim.x / cpb) {
      const int64_t e = elem_offset(L, m / L.HW, c, m % L.HW);
      const float t = Tm[e] + bc;
      Tm[e] = t;
      float g = act_forward<ACT>(t);
      if (g_out != nullptr) {
        const T stored = from_acc<T>(g);
        g_out[e] = stored;
        g = to_acc(stored);
        if (t_out != nullptr) t_out[e] = from_acc<T>(t);
      }
      acc.merge(1.f, g, 0.f);
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

// Elementwise over the dense output (element e has channel (e / sC) % C for either layout).
// y = A*act(t) + B with A = gamma*rstd, B = beta - mean*A; A = 1, B = 0 (y = act(t)) when !apply_bn.
template <typename T, int ACT>
__global__ void cab_apply_kernel(Layout L, const float* __restrict__ Tm, const T* __restrict__ b_or_null,
                                 const float* __restrict__ gamma, const float* __restrict__ beta,
                                 const float* __restrict__ mean, const float* __restrict__ rstd, bool apply_bn,
                                 T* __restrict__ t_out, T* __restrict__ y, int64_t numel) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < numel; e += stride) {
    const int64_t c = (e / L.sC) % L.C;
    const float t = Tm[e] + (b_or_null != nullptr ? to_acc(b_or_null[c]) : 0.f);
    if (t_out != nullptr) t_out[e] = from_acc<T>(t);
    const float a = apply_bn ? gamma[c] * rstd[c] : 1.f;
    const float shift = apply_bn ? beta[c] - mean[c] * a : 0.f;
    y[e] = from_acc<T>(a * act_forward<ACT>(t) + shift);
  }
}

template <typename T, int ACT>
__global__ void cab_backward_reduce_kernel(Layout L, const T* __restrict__ dy, const T* __restrict__ t_saved,
                                           const float* __restrict__ T_acc, const T* __restrict__ b,
                                           const float* __restrict__ mean, const float* __restrict__ rstd, int cpb,
                                           int64_t chunk, float* __restrict__ ws) {
  const int tid = threadIdx.x, lane_c = tid % cpb;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * cpb + lane_c;
  const int64_t M = L.N * L.HW, m0 = blockIdx.y * chunk, m1 = m0 + chunk < M ? m0 + chunk : M;
  float s[3] = {0.f, 0.f, 0.f};
  if (c < L.C) {
    const float bc = to_acc(b[c]), mu = mean[c], rs = rstd[c];
    for (int64_t m = m0 + tid / cpb; m < m1; m += blockDim.x / cpb) {
      const int64_t e = elem_offset(L, m / L.HW, c, m % L.HW);
      const float d = to_acc(dy[e]), ghat = (act_forward<ACT>(load_t(t_saved, T_acc, bc, e)) - mu) * rs;
      s[0] += d;
      s[1] += d * ghat;
      s[2] += ghat;
    }
  }
  block_channel_sums<3>(s, cpb);
  if (tid < cpb && c < L.C) {
    float* o = ws + (static_cast<int64_t>(blockIdx.y) * L.C + c) * 3;
    o[0] = s[0];
    o[1] = s[1];
    o[2] = s[2];
  }
}

// Per-channel coefficients of dt = a*(dy - c1 - ghat*c2)*act'(t), M = N*Ho*Wo:
//   BN applied here (dy = dL/dy): a = gamma*rstd; training c1 = sum(dy)/M, c2 = sum(dy*ghat)/M and the
//   recentring dhat (sums after launch_recentre_sums).
//   BN deferred (dy = dL/dg, g = act(t)): a = 1; training c1 = -dmean/M, c2 = drstd*rstd^2/M, i.e.
//   dg = dy + dmean/M - drstd*rstd^2*ghat/M with dmean, drstd the gradients of the batch mean and rstd
//   (null: zero).  Eval: c1 = c2 = 0.
struct DtCoefficients {
  float a, c1, c2, dhat;
};
CMK_DEV DtCoefficients dt_coefficients(int64_t c, float inv_m, bool batch_stats, bool apply_bn,
                                       const float* __restrict__ gamma, const float* __restrict__ rstd,
                                       const float* __restrict__ sums, const float* __restrict__ dmean,
                                       const float* __restrict__ drstd) {
  const float rs = rstd[c];
  if (apply_bn)
    return {gamma[c] * rs, batch_stats ? sums[c * 3] * inv_m : 0.f, batch_stats ? sums[c * 3 + 1] * inv_m : 0.f,
            batch_stats ? sums[c * 3 + 2] : 0.f};
  return {1.f, batch_stats && dmean != nullptr ? -dmean[c] * inv_m : 0.f,
          batch_stats && drstd != nullptr ? drstd[c] * rs * rs * inv_m : 0.f, 0.f};
}

// dt = a*(dy - c1 - ghat*c2)*act'(t) (coefficients above), written as dT; per-split partials of sum dt.
template <typename T, int ACT>
__global__ void cab_backward_dt_kernel(Layout L, const T* __restrict__ dy, const T* __restrict__ t_saved,
                                       const float* __restrict__ T_acc, const T* __restrict__ b,
                                       const float* __restrict__ gamma, const float* __restrict__ mean,
                                       const float* __restrict__ rstd, const float* __restrict__ sums,
                                       const float* __restrict__ dmean, const float* __restrict__ drstd,
                                       bool batch_stats, bool apply_bn, int cpb, int64_t chunk, T* __restrict__ dT,
                                       float* __restrict__ ws) {
  const int tid = threadIdx.x, lane_c = tid % cpb;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * cpb + lane_c;
  const int64_t M = L.N * L.HW, m0 = blockIdx.y * chunk, m1 = m0 + chunk < M ? m0 + chunk : M;
  float s[1] = {0.f};
  if (c < L.C) {
    const float bc = to_acc(b[c]), mu = mean[c], rs = rstd[c];
    const DtCoefficients co =
        dt_coefficients(c, 1.f / static_cast<float>(M), batch_stats, apply_bn, gamma, rstd, sums, dmean, drstd);
    for (int64_t m = m0 + tid / cpb; m < m1; m += blockDim.x / cpb) {
      const int64_t e = elem_offset(L, m / L.HW, c, m % L.HW);
      const float t = load_t(t_saved, T_acc, bc, e);
      // a deferred BN normalized the stored g (csrc/cpu/conv_act_bn.cpp g_as_stored)
      const float g = apply_bn ? act_forward<ACT>(t) : to_acc(from_acc<T>(act_forward<ACT>(t)));
      const float ghat = (g - mu) * rs - co.dhat;
      const float dt = co.a * (to_acc(dy[e]) - co.c1 - ghat * co.c2) * act_backward<ACT>(t);
      dT[e] = from_acc<T>(dt);
      s[0] += dt;
    }
  }
  block_channel_sums<1>(s, cpb);
  if (tid < cpb && c < L.C) ws[static_cast<int64_t>(blockIdx.y) * L.C + c] = s[0];
}

}  // namespace

int64_t conv_act_bn_workspace_floats(const Problem& p, const LaunchShape& s) {
  return plan_splits(p, s).splits * p.C * 3;
}

void conv_act_bn_forward_launch(const Problem& p, const LaunchShape& s, float* Tm, const void* b, const float* gamma,
                                const float* beta, float* mean, float* rstd, float* var, bool batch_stats, float eps,
                                bool apply_bn, void* y, void* t_out, float* ws, void* stream) {
  const Layout L = make_layout(p);
  dispatch_dtype_act(p.dtype, p.act, [&](auto tag, auto act) {
    using T = typename decltype(tag)::type;
    constexpr int A = decltype(act)::value;
    const T* bp = static_cast<const T*>(b);
    if (batch_stats) {
      const SplitPlan sp = plan_splits(p, s);
      auto kern = &cab_stats_partial_kernel<T, A>;
      T* g_out = apply_bn ? nullptr : static_cast<T*>(y);  // deferred BN: y = act(t) written here
      CMK_LAUNCH(kern, dim3(static_cast<unsigned>(sp.groups), static_cast<unsigned>(sp.splits)), dim3(s.threads), 0,
                 stream, L, Tm, bp, sp.cpb, sp.chunk, ws, g_out, apply_bn ? nullptr : static_cast<T*>(t_out));
      CMK_CHECK_LAUNCH("cab_stats_partial_kernel");
      launch_welford_finalize(ws, sp.splits, p.C, eps, mean, var, rstd, stream);
      if (!apply_bn) return;  // no apply pass
    }
    const int64_t numel = p.N * p.C * p.H * p.W;
    const unsigned blocks = static_cast<unsigned>(
        std::max<int64_t>(1, std::min<int64_t>(s.elementwise_blocks, ceil_div(numel, s.threads))));
    auto kern = &cab_apply_kernel<T, A>;
    CMK_LAUNCH(kern, dim3(blocks), dim3(s.threads), 0, stream, L, static_cast<const float*>(Tm),
               batch_stats ? nullptr : bp, gamma, beta, static_cast<const float*>(mean),
               static_cast<const float*>(rstd), apply_bn, static_cast<T*>(t_out), static_cast<T*>(y), numel);
    CMK_CHECK_LAUNCH("cab_apply_kernel");
  });
}

void conv_act_bn_backward_launch(const Problem& p, const LaunchShape& s, const void* dy, const void* t_saved,
                                 const float* T_acc, const void* b, const float* gamma, const float* mean,
                                 const float* rstd, const float* dmean, const float* drstd, bool batch_stats,
                                 bool apply_bn, void* dT, float* sums, float* sum_dt, float* ws, void* stream) {
  const Layout L = make_layout(p);
  dispatch_dtype_act(p.dtype, p.act, [&](auto tag, auto act) {
    using T = typename decltype(tag)::type;
    constexpr int A = decltype(act)::value;
    const T* dyp = static_cast<const T*>(dy);
    const T* tp = static_cast<const T*>(t_saved);
    const T* bp = static_cast<const T*>(b);
    const SplitPlan sp = plan_splits(p, s);
    const dim3 grid(static_cast<unsigned>(sp.groups), static_cast<unsigned>(sp.splits));
    if (apply_bn) {  // dbeta, dgamma and the training terms of dg; a deferred BN has neither
      auto reduce = &cab_backward_reduce_kernel<T, A>;
      CMK_LAUNCH(reduce, grid, dim3(s.threads), 0, stream, L, dyp, tp, T_acc, bp, mean, rstd, sp.cpb, sp.chunk, ws);
      CMK_CHECK_LAUNCH("cab_backward_reduce_kernel");
      launch_sum_splits(ws, sp.splits, p.C * 3, sums, stream);
      if (batch_stats) launch_recentre_sums(sums, p.C, 1.f / static_cast<float>(L.N * L.HW), stream);
    }
    auto dt = &cab_backward_dt_kernel<T, A>;
    CMK_LAUNCH(dt, grid, dim3(s.threads), 0, stream, L, dyp, tp, T_acc, bp, gamma, mean, rstd,
               static_cast<const float*>(sums), dmean, drstd, batch_stats, apply_bn, sp.cpb, sp.chunk,
               static_cast<T*>(dT), ws);
    CMK_CHECK_LAUNCH("cab_backward_dt_kernel");
    launch_sum_splits(ws, sp.splits, p.C, sum_dt, stream);
  });
}

}  // namespace CMK_KNS
}  // namespace cmk
