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
template <typename T, typename A = acc_of<T>>
CMK_DEV A load_t(const T* __restrict__ t_saved, const A* __restrict__ T_acc, A bias, int64_t e) {
  return t_saved != nullptr ? to_acc(t_saved[e]) : to_acc(from_acc<T>(T_acc[e] + bias));
}

// With g_out (the BN apply deferred to the next depthwise block) it also writes y = g = act(t), and
// t in the input dtype to t_out when given, so no apply pass follows; the moments are then those of
// the stored (rounded: round_as_stored) g, which the next block normalizes (csrc/cpu/conv_act_bn.cpp
// stats_pass).
template <typename T, int ACT>
__global__ void cab_stats_partial_kernel(Layout L, ScalarKind stored, acc_of<T>* __restrict__ Tm,
                                         const T* __restrict__ b, int cpb, int64_t chunk, acc_of<T>* __restrict__ ws,
                                         T* __restrict__ g_out, T* __restrict__ t_out) {
  using A = acc_of<T>;
  const int tid = threadIdx.x, lane_c = tid % cpb;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * cpb + lane_c;
  const int64_t M = L.N * L.HW, m0 = blockIdx.y * chunk, m1 = m0 + chunk < M ? m0 + chunk : M;
  Welford<A> acc;
  if (c < L.C) {
    const A bc = to_acc(b[c]);
    for (int64_t m = m0 + tid / cpb; m < m1; m += blockDim.x / cpb) {
      const int64_t e = elem_offset(L, m / L.HW, c, m % L.HW);
      const A t = Tm[e] + bc;
      Tm[e] = t;
      A g = act_forward<ACT>(t);
      if (g_out != nullptr) {
        g = round_as_stored<T>(g, stored);
        g_out[e] = from_acc<T>(g);
        if (t_out != nullptr) t_out[e] = from_acc<T>(t);
      }
      acc.merge(A(1), g, A(0));
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

// Elementwise over the dense output (element e has channel (e / sC) % C for either layout).
// y = A*act(t) + B with A = gamma*rstd, B = beta - mean*A; A = 1, B = 0 (y = act(t)) when !apply_bn.
template <typename T, int ACT>
__global__ void cab_apply_kernel(Layout L, const acc_of<T>* __restrict__ Tm, const T* __restrict__ b_or_null,
                                 const acc_of<T>* __restrict__ gamma, const acc_of<T>* __restrict__ beta,
                                 const acc_of<T>* __restrict__ mean, const acc_of<T>* __restrict__ rstd,
                                 bool apply_bn, T* __restrict__ t_out, T* __restrict__ y, int64_t numel) {
  using A = acc_of<T>;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < numel; e += stride) {
    const int64_t c = (e / L.sC) % L.C;
    const A t = Tm[e] + (b_or_null != nullptr ? to_acc(b_or_null[c]) : A(0));
    if (t_out != nullptr) t_out[e] = from_acc<T>(t);
    const A a = apply_bn ? gamma[c] * rstd[c] : A(1);
    const A shift = apply_bn ? beta[c] - mean[c] * a : A(0);
    y[e] = from_acc<T>(a * act_forward<ACT>(t) + shift);
  }
}

template <typename T, int ACT>
__global__ void cab_backward_reduce_kernel(Layout L, const T* __restrict__ dy, const T* __restrict__ t_saved,
                                           const acc_of<T>* __restrict__ T_acc, const T* __restrict__ b,
                                           const acc_of<T>* __restrict__ mean, const acc_of<T>* __restrict__ rstd,
                                           int cpb, int64_t chunk, acc_of<T>* __restrict__ ws) {
  using A = acc_of<T>;
  const int tid = threadIdx.x, lane_c = tid % cpb;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * cpb + lane_c;
  const int64_t M = L.N * L.HW, m0 = blockIdx.y * chunk, m1 = m0 + chunk < M ? m0 + chunk : M;
  A s[3] = {0, 0, 0};
  if (c < L.C) {
    const A bc = to_acc(b[c]), mu = mean[c], rs = rstd[c];
    for (int64_t m = m0 + tid / cpb; m < m1; m += blockDim.x / cpb) {
      const int64_t e = elem_offset(L, m / L.HW, c, m % L.HW);
      const A d = to_acc(dy[e]), ghat = (act_forward<ACT>(load_t(t_saved, T_acc, bc, e)) - mu) * rs;
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

// Per-channel coefficients of dt = a*(dy - c1 - ghat*c2)*act'(t), M = N*Ho*Wo:
//   BN applied here (dy = dL/dy): a = gamma*rstd; training c1 = sum(dy)/M, c2 = sum(dy*ghat)/M and the
//   recentring dhat (sums after launch_recentre_sums).
//   BN deferred (dy = dL/dg, g = act(t)): a = 1; training c1 = -dmean/M, c2 = drstd*rstd^2/M, i.e.
//   dg = dy + dmean/M - drstd*rstd^2*ghat/M with dmean, drstd the gradients of the batch mean and rstd
//   (null: zero).  Eval: c1 = c2 = 0.
template <typename A>
struct DtCoefficients {
  A a, c1, c2, dhat;
};
template <typename A>
CMK_DEV DtCoefficients<A> dt_coefficients(int64_t c, A inv_m, bool batch_stats, bool apply_bn,
                                          const A* __restrict__ gamma, const A* __restrict__ rstd,
                                          const A* __restrict__ sums, const A* __restrict__ dmean,
                                          const A* __restrict__ drstd) {
  const A rs = rstd[c], zero = 0;
  if (apply_bn)
    return {gamma[c] * rs, batch_stats ? sums[c * 3] * inv_m : zero, batch_stats ? sums[c * 3 + 1] * inv_m : zero,
            batch_stats ? sums[c * 3 + 2] : zero};
  return {A(1), batch_stats && dmean != nullptr ? -dmean[c] * inv_m : zero,
          batch_stats && drstd != nullptr ? drstd[c] * rs * rs * inv_m : zero, zero};
}

// dt = a*(dy - c1 - ghat*c2)*act'(t) (coefficients above), written as dT; per-split partials of sum dt.
template <typename T, int ACT>
__global__ void cab_backward_dt_kernel(Layout L, ScalarKind stored, const T* __restrict__ dy,
                                       const T* __restrict__ t_saved, const acc_of<T>* __restrict__ T_acc,
                                       const T* __restrict__ b, const acc_of<T>* __restrict__ gamma,
                                       const acc_of<T>* __restrict__ mean, const acc_of<T>* __restrict__ rstd,
                                       const acc_of<T>* __restrict__ sums, const acc_of<T>* __restrict__ dmean,
                                       const acc_of<T>* __restrict__ drstd, bool batch_stats, bool apply_bn, int cpb,
                                       int64_t chunk, T* __restrict__ dT, acc_of<T>* __restrict__ ws) {
  using A = acc_of<T>;
  const int tid = threadIdx.x, lane_c = tid % cpb;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * cpb + lane_c;
  const int64_t M = L.N * L.HW, m0 = blockIdx.y * chunk, m1 = m0 + chunk < M ? m0 + chunk : M;
  A s[1] = {0};
  if (c < L.C) {
    const A bc = to_acc(b[c]), mu = mean[c], rs = rstd[c];
    const DtCoefficients<A> co =
        dt_coefficients(c, A(1) / static_cast<A>(M), batch_stats, apply_bn, gamma, rstd, sums, dmean, drstd);
    for (int64_t m = m0 + tid / cpb; m < m1; m += blockDim.x / cpb) {
      const int64_t e = elem_offset(L, m / L.HW, c, m % L.HW);
      const A t = load_t(t_saved, T_acc, bc, e);
      // a deferred BN normalized the stored g (csrc/cpu/conv_act_bn.cpp g_as_stored)
      const A g = apply_bn ? act_forward<ACT>(t) : round_as_stored<T>(act_forward<ACT>(t), stored);
      const A ghat = (g - mu) * rs - co.dhat;
      const A dt = co.a * (to_acc(dy[e]) - co.c1 - ghat * co.c2) * act_backward<ACT>(t);
      dT[e] = from_acc<T>(dt);
      s[0] += dt;
    }
  }
  block_channel_sums<1>(s, cpb);
  if (tid < cpb && c < L.C) ws[static_cast<int64_t>(blockIdx.y) * L.C + c] = s[0];
}

}  // namespace

template <typename A>
int64_t ConvActBnLaunch<A>::workspace_elems(const Problem& p, const LaunchShape& s) {
  return plan_splits(p, s).splits * p.C * 3;
}

template <typename A>
void ConvActBnLaunch<A>::forward(const Problem& p, const LaunchShape& s, ScalarKind stored, A* Tm, const void* b,
                                 const A* gamma, const A* beta, A* mean, A* rstd, A* var, bool batch_stats, A eps,
                                 bool apply_bn, void* y, void* t_out, A* ws, void* stream) {
  const Layout L = make_layout(p);
  dispatch_dtype_act<A>(p.dtype, p.act, [&](auto tag, auto act) {
    using T = typename decltype(tag)::type;
    constexpr int ACT = decltype(act)::value;
    const T* bp = static_cast<const T*>(b);
    if (batch_stats) {
      const SplitPlan sp = plan_splits(p, s);
      auto kern = &cab_stats_partial_kernel<T, ACT>;
      T* g_out = apply_bn ? nullptr : static_cast<T*>(y);  // deferred BN: y = act(t) written here
      CMK_LAUNCH(kern, dim3(static_cast<unsigned>(sp.groups), static_cast<unsigned>(sp.splits)), dim3(s.threads), 0,
                 stream, L, stored, Tm, bp, sp.cpb, sp.chunk, ws, g_out, apply_bn ? nullptr : static_cast<T*>(t_out));
      CMK_CHECK_LAUNCH("cab_stats_partial_kernel");
      launch_welford_finalize<A>(ws, sp.splits, p.C, eps, mean, var, rstd, stream);
      if (!apply_bn) return;  // no apply pass
    }
    const int64_t numel = p.N * p.C * p.H * p.W;
    const unsigned blocks = static_cast<unsigned>(
        std::max<int64_t>(1, std::min<int64_t>(s.elementwise_blocks, ceil_div(numel, s.threads))));
    auto kern = &cab_apply_kernel<T, ACT>;
    CMK_LAUNCH(kern, dim3(blocks), dim3(s.threads), 0, stream, L, static_cast<const A*>(Tm),
               batch_stats ? nullptr : bp, gamma, beta, static_cast<const A*>(mean), static_cast<const A*>(rstd),
               apply_bn, static_cast<T*>(t_out), static_cast<T*>(y), numel);
    CMK_CHECK_LAUNCH("cab_apply_kernel");
  });
}

template <typename A>
void ConvActBnLaunch<A>::backward(const Problem& p, const LaunchShape& s, ScalarKind stored, const void* dy,
                                  const void* t_saved, const A* T_acc, const void* b, const A* gamma, const A* mean,
                                  const A* rstd, const A* dmean, const A* drstd, bool batch_stats, bool apply_bn,
                                  void* dT, A* sums, A* sum_dt, A* ws, void* stream) {
  const Layout L = make_layout(p);
  dispatch_dtype_act<A>(p.dtype, p.act, [&](auto tag, auto act) {
    using T = typename decltype(tag)::type;
    constexpr int ACT = decltype(act)::value;
    const T* dyp = static_cast<const T*>(dy);
    const T* tp = static_cast<const T*>(t_saved);
    const T* bp = static_cast<const T*>(b);
    const SplitPlan sp = plan_splits(p, s);
    const dim3 grid(static_cast<unsigned>(sp.groups), static_cast<unsigned>(sp.splits));
    if (apply_bn) {  // dbeta, dgamma and the training terms of dg; a deferred BN has neither
      auto reduce = &cab_backward_reduce_kernel<T, ACT>;
      CMK_LAUNCH(reduce, grid, dim3(s.threads), 0, stream, L, dyp, tp, T_acc, bp, mean, rstd, sp.cpb, sp.chunk, ws);
      CMK_CHECK_LAUNCH("cab_backward_reduce_kernel");
      launch_sum_splits<A>(ws, sp.splits, p.C * 3, sums, stream);
      if (batch_stats) launch_recentre_sums<A>(sums, p.C, A(1) / static_cast<A>(L.N * L.HW), stream);
    }
    auto dt = &cab_backward_dt_kernel<T, ACT>;
    CMK_LAUNCH(dt, grid, dim3(s.threads), 0, stream, L, stored, dyp, tp, T_acc, bp, gamma, mean, rstd,
               static_cast<const A*>(sums), dmean, drstd, batch_stats, apply_bn, sp.cpb, sp.chunk,
               static_cast<T*>(dT), ws);
    CMK_CHECK_LAUNCH("cab_backward_dt_kernel");
    launch_sum_splits<A>(ws, sp.splits, p.C, sum_dt, stream);
  });
}

template struct ConvActBnLaunch<float>;
template struct ConvActBnLaunch<double>;

}  // namespace CMK_KNS
}  // namespace cmk
