// Fused conv -> act -> BatchNorm on the CPU, for the 1x1 pointwise conv and the patch-embedding stem
// (a conv with kernel p and stride p). Both are a GEMM plus a per-channel epilogue:
//   T = Z @ W^T (GEMM),  t = T + b,  g = act(t),  y = gamma * (g - mean) * rstd + beta
// where Z is the input as an (M x Cin*p*p) matrix of patches. The GEMM output is laid out like the
// result: NCHW (N, Cout, L) when the input is NCHW, (M, Cout) when it is channels_last. The epilogue
// sees it as a (P, C, Q) array: NCHW P = N, Q = L; channels_last P = M, Q = 1.
//
// The GEMMs in channels_last go through oneDNN (onednn_gemm.h), NCHW's batched ones through at::matmul.
// Passes (each a single sweep over the GEMM output, vectorized along its contiguous axis):
//   eval forward     : y = A*act(T + b) + B in place in the GEMM output (t written too when saved).
//                      With the BN apply deferred (fp32, channels_last), g = act(Z W^T + b) is the GEMM
//                      itself, bias and activation its oneDNN post-ops: no pass over its output at all.
//   training forward : t = T + b in place with block-wise mean/M2 of act(t), merged with Chan's rule;
//                      then y = A*act(t) + B.
//   apply_bn = false : y = act(t) (the BN apply is folded into the next depthwise block's load); in
//                      training the statistics pass writes it, so the apply pass is skipped.
//   backward         : reduce sum(dy), sum(dy*ghat) (training only); then dt = dg*act'(t) with
//                      db = sum(dt) (and, in eval, the dgamma/dbeta sums) in one sweep; then the
//                      two GEMMs dW = dT^T Z and dZ = dT W.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <type_traits>
#include <tuple>
#include <utility>
#include <vector>

#include "../common/block_math.h"
#include "../common/patch_gemm.h"
#include "conv_act_bn.h"
#include "onednn_gemm.h"

namespace cmk {
namespace cpu {
namespace {

struct PCQ {
  int64_t P, C, Q;
};

// Rows per parallel block in channels_last (a block of rows x C stays in L2 for the two-pass stats).
constexpr int64_t kRowsPerBlock = 64;

template <bool CL>
int64_t num_blocks(const PCQ& s) {
  return CL ? (s.P + kRowsPerBlock - 1) / kRowsPerBlock : s.P;
}
template <bool CL>
std::pair<int64_t, int64_t> block_rows(const PCQ& s, int64_t b) {
  return CL ? std::make_pair(b * kRowsPerBlock, std::min(s.P, (b + 1) * kRowsPerBlock)) : std::make_pair(b, b + 1);
}

// Training statistics: T += b in place (T is the GEMM output in the accumulation type); returns the
// g = act(t) as the next block reads it: rounded to the output dtype when STORED.
template <typename scalar_t, int A, bool STORED, typename acc_t>
inline acc_t g_value(acc_t t) {
  const acc_t g = act_forward<A>(t);
  return STORED ? static_cast<acc_t>(static_cast<scalar_t>(g)) : g;
}

// The backward's g: act(t) as the forward stored it when the BN apply was deferred (g_dtype, the stored
// dtype; Undefined when the op applied the BN itself). The next block normalized the stored g, so ghat
// (the rstd gradient's weights) must be of the stored g too. On the exact double path the stored
// dtype is the caller's, known at run time.
template <typename scalar_t, typename acc_t>
inline acc_t round_as_stored(acc_t g, at::ScalarType g_dtype) {
  if constexpr (std::is_same_v<scalar_t, double>) {
    switch (g_dtype) {
      case at::kFloat: return static_cast<float>(g);
      case at::kBFloat16: return static_cast<float>(c10::BFloat16(static_cast<float>(g)));
      case at::kHalf: return static_cast<float>(c10::Half(static_cast<float>(g)));
      default: return g;
    }
  } else {
    return g_dtype == at::ScalarType::Undefined ? g : static_cast<acc_t>(static_cast<scalar_t>(g));
  }
}
// act once, then the select: as two g_value calls GCC evaluated act twice (a division and an exp each).
template <typename scalar_t, int A, typename acc_t>
inline acc_t g_as_stored(acc_t t, at::ScalarType g_dtype) {
  return round_as_stored<scalar_t>(act_forward<A>(t), g_dtype);
}

// mean and biased var of act(T) per channel. Per block, exact two-pass moments over the (cached)
// block; blocks merged in order with Chan's rule. STORE_G (the BN apply left to the next block): the
// second sweep over the cached block also writes g = act(t), and t_out (t in the output dtype) when
// given, so no apply pass over the whole of T follows; the moments are then those of the stored
// (rounded) g, which the next block normalizes. Moments of the unrounded g would scale bf16 rounding
// noise by the wrong rstd: with a small spread, the noise is most of the stored g's variance (a
// depthwise batch mean 170x further from float64 than PyTorch's was seen).
template <typename acc_t, typename scalar_t, bool CL, int A, bool STORE_G>
void stats_pass(const PCQ& s, acc_t* T, const scalar_t* bias, double* mean_out, double* var_out,
                scalar_t* g_out = nullptr, scalar_t* t_out = nullptr) {
  const int64_t nb = num_blocks<CL>(s);
  std::vector<double> bmean(nb * s.C), bm2(nb * s.C), bcount(nb);
  at::parallel_for(0, nb, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> bv(s.C), sum(s.C), m2(s.C), mu(s.C);
    for (int64_t c = 0; c < s.C; ++c) bv[c] = static_cast<acc_t>(bias[c]);
    for (int64_t b = begin; b < end; ++b) {
      const auto [p0, p1] = block_rows<CL>(s, b);
      const double cnt = static_cast<double>((p1 - p0) * s.Q);
      double* bm = bmean.data() + b * s.C;
      double* bq = bm2.data() + b * s.C;
      if (CL) {
        std::fill(sum.begin(), sum.end(), acc_t(0));
        for (int64_t p = p0; p < p1; ++p) {
          acc_t* row = T + p * s.C;
          if (STORE_G) {  // g goes out on this sweep, and the second reads it back instead of recomputing it
            scalar_t* grow = g_out + p * s.C;
#pragma omp simd
            for (int64_t c = 0; c < s.C; ++c) {
              row[c] += bv[c];
              const acc_t gv = g_value<scalar_t, A, true>(row[c]);
              grow[c] = static_cast<scalar_t>(gv);
              sum[c] += gv;
            }
            continue;
          }
#pragma omp simd
          for (int64_t c = 0; c < s.C; ++c) {
            row[c] += bv[c];
            sum[c] += g_value<scalar_t, A, false>(row[c]);
          }
        }
        for (int64_t c = 0; c < s.C; ++c) mu[c] = sum[c] / static_cast<acc_t>(cnt);
        std::fill(m2.begin(), m2.end(), acc_t(0));
        for (int64_t p = p0; p < p1; ++p) {
          const acc_t* row = T + p * s.C;
          if (STORE_G) {
            const scalar_t* grow = g_out + p * s.C;
#pragma omp simd
            for (int64_t c = 0; c < s.C; ++c) {
              const acc_t gv = static_cast<acc_t>(grow[c]);
              m2[c] += (gv - mu[c]) * (gv - mu[c]);
            }
            if (t_out) {
              scalar_t* trow = t_out + p * s.C;
#pragma omp simd
              for (int64_t c = 0; c < s.C; ++c) trow[c] = static_cast<scalar_t>(row[c]);
            }
            continue;
          }
#pragma omp simd
          for (int64_t c = 0; c < s.C; ++c) {
            const acc_t d = act_forward<A>(row[c]) - mu[c];
            m2[c] += d * d;
          }
        }
        for (int64_t c = 0; c < s.C; ++c) {
          bm[c] = mu[c];
          bq[c] = m2[c];
        }
      } else {
        for (int64_t c = 0; c < s.C; ++c) {
          acc_t* plane = T + (p0 * s.C + c) * s.Q;
          const acc_t b0 = bv[c];
          acc_t sm = 0;
#pragma omp simd reduction(+ : sm)
          for (int64_t q = 0; q < s.Q; ++q) {
            plane[q] += b0;
            sm += g_value<scalar_t, A, STORE_G>(plane[q]);
          }
          const acc_t m = sm / static_cast<acc_t>(cnt);
          acc_t sq = 0;
          if (STORE_G) {
            scalar_t* gp = g_out + (p0 * s.C + c) * s.Q;
            scalar_t* tp = t_out ? t_out + (p0 * s.C + c) * s.Q : nullptr;
#pragma omp simd reduction(+ : sq)
            for (int64_t q = 0; q < s.Q; ++q) {
              const acc_t gv = g_value<scalar_t, A, true>(plane[q]);
              gp[q] = static_cast<scalar_t>(gv);
              if (tp) tp[q] = static_cast<scalar_t>(plane[q]);
              sq += (gv - m) * (gv - m);
            }
          } else {
#pragma omp simd reduction(+ : sq)
            for (int64_t q = 0; q < s.Q; ++q) {
              const acc_t d = act_forward<A>(plane[q]) - m;
              sq += d * d;
            }
          }
          bm[c] = m;
          bq[c] = sq;
        }
      }
      bcount[b] = cnt;
    }
  });
  for (int64_t c = 0; c < s.C; ++c) {
    Welford<double> w;
    for (int64_t b = 0; b < nb; ++b) w.merge(bcount[b], bmean[b * s.C + c], bm2[b * s.C + c]);
    mean_out[c] = w.mean;
    var_out[c] = w.m2 / w.count;
  }
}

// t = T (+ bias when given);  y = scale*act(t) + shift;  t_out = t rounded to the output dtype when
// given. y and t_out may alias T when the dtypes agree (each element is read before it is written).
template <typename acc_t, typename scalar_t, bool CL, int A>
void apply_pass(const PCQ& s, const acc_t* T, const scalar_t* bias, scalar_t* t_out, const double* scale,
                const double* shift, scalar_t* y) {
  const int64_t nb = num_blocks<CL>(s);
  std::vector<acc_t> bv(s.C, acc_t(0)), sc(s.C), sh(s.C);
  for (int64_t c = 0; c < s.C; ++c) {
    if (bias) bv[c] = static_cast<acc_t>(bias[c]);
    sc[c] = static_cast<acc_t>(scale[c]);
    sh[c] = static_cast<acc_t>(shift[c]);
  }
  at::parallel_for(0, nb, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const auto [p0, p1] = block_rows<CL>(s, b);
      for (int64_t p = p0; p < p1; ++p) {
        if (CL) {
          const int64_t o = p * s.C;
#pragma omp simd
          for (int64_t c = 0; c < s.C; ++c) {
            const acc_t t = T[o + c] + bv[c];
            if (t_out) t_out[o + c] = static_cast<scalar_t>(t);
            y[o + c] = static_cast<scalar_t>(sc[c] * act_forward<A>(t) + sh[c]);
          }
        } else {
          for (int64_t c = 0; c < s.C; ++c) {
            const int64_t o = (p * s.C + c) * s.Q;
            const acc_t b0 = bv[c], a = sc[c], d = sh[c];
            if (t_out) {
#pragma omp simd
              for (int64_t q = 0; q < s.Q; ++q) {
                const acc_t t = T[o + q] + b0;
                t_out[o + q] = static_cast<scalar_t>(t);
                y[o + q] = static_cast<scalar_t>(a * act_forward<A>(t) + d);
              }
            } else {
#pragma omp simd
              for (int64_t q = 0; q < s.Q; ++q) y[o + q] = static_cast<scalar_t>(a * act_forward<A>(T[o + q] + b0) + d);
            }
          }
        }
      }
    }
  });
}

// Backward elementwise work over (P, C, Q).
//   reduce_only: sums sum(dy), sum(dy*ghat) and sum(g - mean) per channel.
//   otherwise  : dt = a*(dy - c1 - ghat*c2)*act'(t) into dT, and sum(dt), sum(dy), sum(dy*ghat).
// ghat = ((g - mean) - delta)*rstd: delta (null: 0) recentres ghat on the exact mean of g, which the
// rounded mean misses by up to ulp(mean)/2 (see the backward's comment in dw_block.cpp for why it matters).
template <typename scalar_t, bool CL, int A, bool FORM_DT>
void backward_pass_impl(const PCQ& s, const scalar_t* dy, const scalar_t* t, const double* mean, const double* rstd,
                   const double* delta, const double* a, const double* c1, const double* c2, scalar_t* dT,
                   double* sum_dt, double* sum_dy, double* sum_dyg, at::ScalarType g_dtype) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t nb = num_blocks<CL>(s);
  constexpr bool form_dt = FORM_DT;
  const int nthreads = at::get_num_threads();
  std::vector<double> part(static_cast<size_t>(nthreads) * 3 * s.C, 0.0);
  // dg = a*(dy - c1 - ghat*c2) in acc_t, as the depthwise backward forms it: with few values per channel
  // its terms nearly cancel, but those calls (at most exact_training_max_count values per channel) run
  // in double as a whole (backward() below). ghat = ((g - mean) - delta)*rstd: the recentring delta is
  // ulp-sized, so it is taken off after the mean, not folded into it (mean + delta would round it away).
  std::vector<acc_t> mu(s.C), rs(s.C), dl(s.C), av(s.C), k1(s.C), k2(s.C);
  for (int64_t c = 0; c < s.C; ++c) {
    mu[c] = static_cast<acc_t>(mean[c]);
    rs[c] = static_cast<acc_t>(rstd[c]);
    dl[c] = static_cast<acc_t>(delta ? delta[c] : 0.0);
    if (form_dt) {
      av[c] = static_cast<acc_t>(a[c]);
      k1[c] = static_cast<acc_t>(c1[c]);
      k2[c] = static_cast<acc_t>(c2[c]);
    }
  }
  at::parallel_for(0, nb, 1, [&](int64_t begin, int64_t end) {
    double* pdt = part.data() + static_cast<size_t>(at::get_thread_num()) * 3 * s.C;
    double* pdy = pdt + s.C;
    double* pdyg = pdy + s.C;
    std::vector<acc_t> sdt(s.C), sdy(s.C), sdyg(s.C);
    for (int64_t b = begin; b < end; ++b) {
      const auto [p0, p1] = block_rows<CL>(s, b);
      std::fill(sdt.begin(), sdt.end(), acc_t(0));
      std::fill(sdy.begin(), sdy.end(), acc_t(0));
      std::fill(sdyg.begin(), sdyg.end(), acc_t(0));
      for (int64_t p = p0; p < p1; ++p) {
        if (CL) {
          const int64_t o = p * s.C;
#pragma omp simd
          for (int64_t c = 0; c < s.C; ++c) {
            const acc_t tv = static_cast<acc_t>(t[o + c]);
            const acc_t d = static_cast<acc_t>(dy[o + c]);
            if constexpr (form_dt) {
              const ActGrad<acc_t> ag = act_with_grad<A>(tv);
              const acc_t gh = ((round_as_stored<scalar_t>(ag.g, g_dtype) - mu[c]) - dl[c]) * rs[c];
              sdy[c] += d;
              sdyg[c] += d * gh;
              const acc_t dt = av[c] * (d - k1[c] - gh * k2[c]) * ag.dg;
              dT[o + c] = static_cast<scalar_t>(dt);
              sdt[c] += dt;
            } else {  // reduce pass: sum(g - mean) in the sum(dt) slot
              const acc_t gc = g_as_stored<scalar_t, A>(tv, g_dtype) - mu[c];
              sdy[c] += d;
              sdyg[c] += d * (gc * rs[c]);
              sdt[c] += gc;
            }
          }
        } else {
          for (int64_t c = 0; c < s.C; ++c) {
            const int64_t o = (p * s.C + c) * s.Q;
            const acc_t m = mu[c], r = rs[c], dlc = dl[c], aa = av[c], kk1 = k1[c], kk2 = k2[c];
            acc_t s0 = 0, s1 = 0, s2 = 0;
            if constexpr (form_dt) {
#pragma omp simd reduction(+ : s0, s1, s2)
              for (int64_t q = 0; q < s.Q; ++q) {
                const acc_t tv = static_cast<acc_t>(t[o + q]);
                const acc_t d = static_cast<acc_t>(dy[o + q]);
                const ActGrad<acc_t> ag = act_with_grad<A>(tv);
                const acc_t gh = ((round_as_stored<scalar_t>(ag.g, g_dtype) - m) - dlc) * r;
                const acc_t dt = aa * (d - kk1 - gh * kk2) * ag.dg;
                dT[o + q] = static_cast<scalar_t>(dt);
                s0 += dt;
                s1 += d;
                s2 += d * gh;
              }
            } else {
#pragma omp simd reduction(+ : s0, s1, s2)
              for (int64_t q = 0; q < s.Q; ++q) {
                const acc_t tv = static_cast<acc_t>(t[o + q]);
                const acc_t d = static_cast<acc_t>(dy[o + q]);
                const acc_t gc = g_as_stored<scalar_t, A>(tv, g_dtype) - m;
                s0 += gc;
                s1 += d;
                s2 += d * (gc * r);
              }
            }
            sdt[c] += s0;
            sdy[c] += s1;
            sdyg[c] += s2;
          }
        }
      }
      for (int64_t c = 0; c < s.C; ++c) {
        pdt[c] += sdt[c];
        pdy[c] += sdy[c];
        pdyg[c] += sdyg[c];
      }
    }
  });
  for (int64_t c = 0; c < s.C; ++c) {
    double a0 = 0, a1 = 0, a2 = 0;
    for (int th = 0; th < nthreads; ++th) {
      const double* pp = part.data() + static_cast<size_t>(th) * 3 * s.C;
      a0 += pp[c];
      a1 += pp[s.C + c];
      a2 += pp[2 * s.C + c];
    }
    if (sum_dt) sum_dt[c] = a0;
    sum_dy[c] = a1;
    sum_dyg[c] = a2;
  }
}

// dT null: the reduce pass (sum_dt then receives sum(g - mean)). g_dtype: see g_as_stored.
template <typename scalar_t, bool CL, int A>
void backward_pass(const PCQ& s, const scalar_t* dy, const scalar_t* t, const double* mean, const double* rstd,
                   const double* delta, const double* a, const double* c1, const double* c2, scalar_t* dT,
                   double* sum_dt, double* sum_dy, double* sum_dyg,
                   at::ScalarType g_dtype = at::ScalarType::Undefined) {
  if (dT)
    backward_pass_impl<scalar_t, CL, A, true>(s, dy, t, mean, rstd, delta, a, c1, c2, dT, sum_dt, sum_dy, sum_dyg,
                                              g_dtype);
  else
    backward_pass_impl<scalar_t, CL, A, false>(s, dy, t, mean, rstd, delta, a, c1, c2, dT, sum_dt, sum_dy, sum_dyg,
                                               g_dtype);
}


// The BN apply as y = scale*g + shift: scale = gamma*rstd, shift = beta - mean*scale (fp64, C values).
std::pair<at::Tensor, at::Tensor> bn_scale_shift(const at::Tensor& gamma, const at::Tensor& beta,
                                                 const at::Tensor& mean_d, const at::Tensor& rstd_d) {
  const at::Tensor scale = gamma.to(at::kDouble) * rstd_d;
  return {scale, beta.to(at::kDouble) - mean_d * scale};
}

// y[m, c] = scale[c] y[m, c] + shift[c] over a dense (M, C) tensor, in place, in fp32.
template <typename scalar_t>
void scale_shift_rows_(scalar_t* y, int64_t M, int64_t C, const float* scale, const float* shift) {
  at::parallel_for(0, M, std::max<int64_t>(1, 16384 / C), [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      scalar_t* row = y + m * C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) row[c] = static_cast<scalar_t>(static_cast<float>(row[c]) * scale[c] + shift[c]);
    }
  });
}

// T = conv(x, W) without bias in the output layout (patch_gemm.h's gemm_forward), channels_last's
// single GEMM through oneDNN.
at::Tensor gemm_forward_cpu(const PatchGemm& g, const at::Tensor& Z, const at::Tensor& W2) {
  if (g.cl) return mm_nt(Z, W2).view({g.N, g.Ho, g.Wo, g.Cout}).permute({0, 3, 1, 2});
  return gemm_forward(g, Z, W2);
}

PCQ pcq_of(const PatchGemm& g) {
  return g.cl ? PCQ{g.N * g.Ho * g.Wo, g.Cout, 1} : PCQ{g.N, g.Cout, g.Ho * g.Wo};
}

void check_cab_inputs(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& gamma,
                      const at::Tensor& beta, int64_t patch) {
  const char* op = "conv_act_bn";
  check_activation_tensor(op, x);
  check_patch_conv(op, x, weight, bias, patch);
  TORCH_CHECK(weight.device().is_cpu() && bias.device().is_cpu(), op, ": weight and bias must be CPU tensors");
  const int64_t C = weight.size(0);
  const auto acc = acc_type_for(x.scalar_type());
  check_per_channel(op, "gamma", gamma, C, acc);
  check_per_channel(op, "beta", beta, C, acc);
}

// dW = dT^T Z for channels_last, dT (M, Cout) and Z (M, K) dense, the sum over the M pixels split in nb
// chunks whose partial products are added at the end. Why: for narrow GEMMs (the stem's K = 3*p*p,
// a pointwise conv with few input channels) MKL accumulates each entry over all M rows in one run,
// ~M ulp; PyTorch's own weight gradient splits that sum (over threads), and ours was 3x its error at
// M = 280 and 8x at M = 8000 (2 threads, issue 11). Chunks of >= 32 rows cut it to about the rounding
// of dT itself. Wide GEMMs (K >= 64) already sum in cache blocks inside MKL; they take at most 8
// chunks of >= 512 rows, which measured as fast as one mm (a batched GEMM of short chunks is not).
// bf16/fp16 keep one GEMM: their partials would each be rounded to 8 or 11 bits.
at::Tensor weight_grad_cl(const at::Tensor& dT, const at::Tensor& Z) {
  const int64_t M = dT.size(0), K = Z.size(1);
  const bool narrow = K < 64;
  const int64_t nb = std::min<int64_t>(M / (narrow ? 32 : 512), narrow ? 32 : 8);
  if (nb < 2 || at::isReducedFloatingType(dT.scalar_type())) return at::mm(dT.t(), Z);
  const int64_t rows = M / nb, main = nb * rows;
  at::Tensor dW = at::bmm(dT.narrow(0, 0, main).reshape({nb, rows, dT.size(1)}).transpose(1, 2),
                          Z.narrow(0, 0, main).reshape({nb, rows, K}))
                      .sum(0);
  if (main < M) dW.addmm_(dT.narrow(0, main, M - main).t(), Z.narrow(0, main, M - main));
  return dW;
}

template <typename F>
void dispatch_layout_act(bool cl, int64_t act, F&& f) {
  dispatch_act(act, [&](auto ACT) {
    if (cl)
      f(std::true_type{}, ACT);
    else
      f(std::false_type{}, ACT);
  });
}

}  // namespace

std::vector<at::Tensor> conv_act_bn_forward(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                                            const at::Tensor& gamma, const at::Tensor& beta, const at::Tensor& mean,
                                            const at::Tensor& rstd, bool batch_stats, double eps, int64_t act,
                                            int64_t patch, bool save_t, bool apply_bn) {
  check_cab_inputs(x, weight, bias, gamma, beta, patch);
  const PatchGemm g = make_patch_gemm(x, weight, patch);
  if (use_exact_training(x.scalar_type(), batch_stats, g.N * g.Ho * g.Wo)) {
    auto o = conv_act_bn_forward(to_double(x), to_double(weight), to_double(bias), to_double(gamma), to_double(beta),
                                 to_double(mean), to_double(rstd), batch_stats, eps, act, patch, save_t, apply_bn);
    const auto acc = gamma.scalar_type();
    const at::Tensor y = o[0].to(x.scalar_type());
    if (batch_stats && !apply_bn) {  // the moments of the stored g, as in stats_pass
      const at::Tensor gd = y.to(at::kDouble);
      const at::Tensor m = gd.mean({0, 2, 3});
      const at::Tensor v = (gd - m.view({1, -1, 1, 1})).square().mean({0, 2, 3});
      return {y, o[1].to(x.scalar_type()), m.to(acc), (v + eps).rsqrt().to(acc), v.to(acc)};
    }
    return {y, o[1].to(x.scalar_type()), o[2].to(acc), o[3].to(acc), o[4].to(acc)};
  }
  const PCQ s = pcq_of(g);
  const auto acc_opts = gamma.options();
  // The GEMM output stays in the accumulation type (fp32 for bf16/fp16 inputs), so t = T + b is
  // rounded to the input dtype once, as PyTorch's conv does; a sign flip of a rounded bf16 T + b
  // would otherwise change ReLU's derivative.
  const auto acc = acc_type_for(x.scalar_type());
  // Eval: one GEMM with its epilogue, y = act(x W^T + b), in fp32 (our own kernel where selected, else a
  // oneDNN primitive), or in bf16 through oneDNN where the CPU has native bf16 dot products (fp32
  // accumulation, act on the fp32 sum, rounded once). With the BN applied here rather than deferred,
  // our kernel applies its scale and shift in the same epilogue; after oneDNN one in-place pass follows
  // (the BN follows act, so it cannot fold into the weights).
  const bool own = x.scalar_type() == at::kFloat && own_sgemm_selected();
  const bool one_primitive = x.scalar_type() == at::kFloat ? own || onednn_gemm_available()
                             : x.scalar_type() == at::kBFloat16 ? onednn_bf16_native() : false;
  if (!batch_stats && !save_t && g.cl && one_primitive) {
    at::Tensor scale, shift;
    if (apply_bn) {
      check_per_channel("conv_act_bn", "mean", mean, g.Cout, acc);
      check_per_channel("conv_act_bn", "rstd", rstd, g.Cout, acc);
      const auto [scale_d, shift_d] = bn_scale_shift(gamma, beta, mean.to(at::kDouble), rstd.to(at::kDouble));
      scale = scale_d.to(at::kFloat);
      shift = shift_d.to(at::kFloat);
    }
    const at::Tensor W2 = weight.reshape({g.Cout, g.K}).contiguous(), b = bias.contiguous();
    at::Tensor y;
    if (own) {
      GemmEpilogue e{b.const_data_ptr<float>(), static_cast<int>(act), nullptr, nullptr};
      if (apply_bn) e.scale = scale.const_data_ptr<float>(), e.shift = shift.const_data_ptr<float>();
      y = sgemm_nt(patches(g, x), W2, e);
    } else {
      y = linear(patches(g, x), W2, b, static_cast<int>(act));
      if (apply_bn) {
        AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "conv_act_bn_eval_bn", [&] {
          scale_shift_rows_(y.data_ptr<scalar_t>(), y.size(0), g.Cout, scale.const_data_ptr<float>(),
                            shift.const_data_ptr<float>());
        });
      }
    }
    return {y.view({g.N, g.Ho, g.Wo, g.Cout}).permute({0, 3, 1, 2}), at::empty({0}, x.options()),
            at::empty({0}, acc_opts), at::empty({0}, acc_opts), at::empty({0}, acc_opts)};
  }
  at::Tensor T = gemm_forward_cpu(g, patches(g, x).to(acc), weight.reshape({g.Cout, g.K}).to(acc));
  const bool same_type = acc == x.scalar_type();
  at::Tensor mean_d, rstd_d, var_d;
  if (batch_stats) {
    mean_d = poisoned(at::empty({g.Cout}, acc_opts.dtype(at::kDouble)));
    var_d = poisoned(at::empty({g.Cout}, acc_opts.dtype(at::kDouble)));
  } else {
    check_per_channel("conv_act_bn", "mean", mean, g.Cout, acc);
    check_per_channel("conv_act_bn", "rstd", rstd, g.Cout, acc);
    mean_d = mean.to(at::kDouble);
    rstd_d = rstd.to(at::kDouble);
  }
  at::Tensor y, t;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "conv_act_bn_forward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    dispatch_layout_act(g.cl, act, [&](auto CL, auto ACT) {
      constexpr bool cl = decltype(CL)::value;
      constexpr int A = decltype(ACT)::value;
      // Eval without a saved t writes y over the GEMM output when the dtypes agree.
      const bool y_in_place = same_type && !batch_stats && !save_t;
      y = y_in_place ? T : poisoned(at::empty_like(T, T.options().dtype(x.scalar_type())));
      scalar_t* t_out = nullptr;
      if (save_t) {
        if (same_type) {
          t = T;
          t_out = batch_stats ? nullptr : reinterpret_cast<scalar_t*>(T.data_ptr<acc_t>());
        } else {
          t = poisoned(at::empty_like(T, T.options().dtype(x.scalar_type())));
          t_out = t.data_ptr<scalar_t>();
        }
      }
      if (batch_stats) {
        // Training: T += b with the statistics, then the apply pass. T (now t) is kept for the backward.
        // Without apply_bn, the statistics pass writes y = act(t) itself and no apply pass follows.
        if (apply_bn)
          stats_pass<acc_t, scalar_t, cl, A, false>(s, T.data_ptr<acc_t>(), bias.const_data_ptr<scalar_t>(),
                                                    mean_d.data_ptr<double>(), var_d.data_ptr<double>());
        else
          stats_pass<acc_t, scalar_t, cl, A, true>(s, T.data_ptr<acc_t>(), bias.const_data_ptr<scalar_t>(),
                                                   mean_d.data_ptr<double>(), var_d.data_ptr<double>(),
                                                   y.data_ptr<scalar_t>(), t_out);
        rstd_d = (var_d + eps).rsqrt();
        if (!apply_bn) return;
      }
      // Per-channel affine of the apply pass: A = gamma*rstd, B = beta - mean*A (fp64, C values);
      // A = 1, B = 0 (y = act(t)) when the next block applies the BN.
      at::Tensor Aff = at::ones({g.Cout}, acc_opts.dtype(at::kDouble)), Bff = at::zeros_like(Aff);
      if (apply_bn) std::tie(Aff, Bff) = bn_scale_shift(gamma, beta, mean_d, rstd_d);
      const scalar_t* b_apply = batch_stats ? nullptr : bias.const_data_ptr<scalar_t>();
      apply_pass<acc_t, scalar_t, cl, A>(s, T.const_data_ptr<acc_t>(), b_apply, t_out, Aff.const_data_ptr<double>(),
                                         Bff.const_data_ptr<double>(), y.data_ptr<scalar_t>());
    });
  });
  if (!save_t) t = at::empty({0}, x.options());
  if (!batch_stats) return {y, t, at::empty({0}, acc_opts), at::empty({0}, acc_opts), at::empty({0}, acc_opts)};
  return {y, t, mean_d.to(acc), rstd_d.to(acc), var_d.to(acc)};
}

namespace {
// g_dtype: the dtype the forward stored g in when it deferred the BN apply (see g_as_stored).
std::vector<at::Tensor> backward(const at::Tensor& dy_in, const at::Tensor& x, const at::Tensor& weight,
                                 const at::Tensor& bias, const at::Tensor& gamma, const at::Tensor& mean,
                                 const at::Tensor& rstd, const at::Tensor& t_saved, const at::Tensor& dmean,
                                 const at::Tensor& drstd, bool batch_stats, int64_t act, int64_t patch, bool apply_bn,
                                 bool need_dx, at::ScalarType g_dtype) {
  check_cab_inputs(x, weight, bias, gamma, gamma, patch);
  const PatchGemm g = make_patch_gemm(x, weight, patch);
  if (use_exact_training(x.scalar_type(), batch_stats, g.N * g.Ho * g.Wo)) {
    // t is recomputed in double from x (a saved t is rounded to x's dtype).
    auto o = backward(to_double(dy_in), to_double(x), to_double(weight), to_double(bias), to_double(gamma),
                      to_double(mean), to_double(rstd), at::empty({0}, x.options().dtype(at::kDouble)),
                      to_double(dmean), to_double(drstd), batch_stats, act, patch, apply_bn, need_dx, g_dtype);
    const auto acc = gamma.scalar_type();
    return {o[0].to(x.scalar_type()), o[1].to(weight.scalar_type()), o[2].to(bias.scalar_type()), o[3].to(acc),
            o[4].to(acc)};
  }
  const PCQ s = pcq_of(g);
  const auto fmt = g.cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  TORCH_CHECK(dy_in.dim() == 4 && dy_in.size(0) == g.N && dy_in.size(1) == g.Cout && dy_in.size(2) == g.Ho &&
                  dy_in.size(3) == g.Wo,
              "conv_act_bn_backward: grad_output has shape ", dy_in.sizes(), ", expected (", g.N, ", ", g.Cout, ", ",
              g.Ho, ", ", g.Wo, ")");
  const at::Tensor dy = dy_in.contiguous(fmt);
  const at::Tensor W2 = weight.reshape({g.Cout, g.K});
  const at::Tensor Z = patches(g, x);
  at::Tensor t = t_saved;
  if (!t.defined() || t.numel() == 0) {
    // Recompute t = Z W^T + b (cheap when K = Cin*p*p is small, as in the stem).
    const auto acc = acc_type_for(x.scalar_type());
    t = gemm_forward_cpu(g, Z.to(acc), W2.to(acc)).add_(bias.to(acc).view({1, g.Cout, 1, 1})).to(x.scalar_type());
  }
  t = t.contiguous(fmt);
  for (const auto& [name, v] : {std::make_pair("dmean", &dmean), std::make_pair("drstd", &drstd)})
    if (v->numel()) check_per_channel("conv_act_bn_backward", name, *v, g.Cout, gamma.scalar_type());
  const at::Tensor mean_d = mean.to(at::kDouble), rstd_d = rstd.to(at::kDouble);
  const at::Tensor a = apply_bn ? gamma.to(at::kDouble) * rstd_d : at::ones_like(rstd_d);
  const double M = static_cast<double>(g.N * g.Ho * g.Wo);
  at::Tensor sum_dy = poisoned(at::empty({g.Cout}, mean_d.options())), sum_dyg = poisoned(at::empty_like(sum_dy));
  at::Tensor sum_dt = poisoned(at::empty_like(sum_dy));
  at::Tensor dT = poisoned(at::empty_like(t, t.options(), fmt));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "conv_act_bn_backward_cpu", [&] {
    dispatch_layout_act(g.cl, act, [&](auto CL, auto ACT) {
      constexpr bool cl = decltype(CL)::value;
      constexpr int A = decltype(ACT)::value;
      at::Tensor c1 = at::zeros_like(sum_dy), c2 = at::zeros_like(sum_dy), delta;
      if (!apply_bn) {
        // dy is dL/dg; the batch mean and rstd had gradients of their own (the next block's input
        // affine used them): dg += dmean/M - drstd*rstd^2*ghat/M, i.e. c1 = -dmean/M, c2 = drstd*rstd^2/M.
        if (batch_stats && dmean.numel()) c1 = -dmean.to(at::kDouble) / M;
        if (batch_stats && drstd.numel()) c2 = drstd.to(at::kDouble) * rstd_d * rstd_d / M;
      } else if (batch_stats) {
        backward_pass<scalar_t, cl, A>(s, dy.const_data_ptr<scalar_t>(), t.const_data_ptr<scalar_t>(),
                                       mean_d.const_data_ptr<double>(), rstd_d.const_data_ptr<double>(), nullptr,
                                       nullptr, nullptr, nullptr, nullptr, sum_dt.data_ptr<double>(),
                                       sum_dy.data_ptr<double>(), sum_dyg.data_ptr<double>());
        delta = sum_dt / M;  // exact mean of g minus the saved (rounded) one
        c1 = sum_dy / M;
        c2 = (sum_dyg - delta * rstd_d * sum_dy) / M;
      }
      backward_pass<scalar_t, cl, A>(s, dy.const_data_ptr<scalar_t>(), t.const_data_ptr<scalar_t>(),
                                     mean_d.const_data_ptr<double>(), rstd_d.const_data_ptr<double>(),
                                     delta.defined() ? delta.const_data_ptr<double>() : nullptr,
                                     a.const_data_ptr<double>(), c1.const_data_ptr<double>(),
                                     c2.const_data_ptr<double>(), dT.data_ptr<scalar_t>(), sum_dt.data_ptr<double>(),
                                     sum_dy.data_ptr<double>(), sum_dyg.data_ptr<double>(), g_dtype);
    });
  });
  // GEMMs of the backward: dW = dT^T Z, dZ = dT W.
  at::Tensor dW2, dZ;
  if (g.cl) {
    const at::Tensor dTm = dT.permute({0, 2, 3, 1}).reshape({g.N * g.Ho * g.Wo, g.Cout});
    dW2 = weight_grad_cl(dTm, Z);
    if (need_dx) dZ = mm_nt(dTm, W2.t());  // (M, K)
  } else {
    const at::Tensor dTm = dT.view({g.N, g.Cout, g.Ho * g.Wo});
    dW2 = at::zeros({g.Cout, g.K}, dT.options().dtype(at::toOpMathType(x.scalar_type())));
    for (int64_t n = 0; n < g.N; ++n) dW2.addmm_(dTm[n].to(dW2.scalar_type()), Z[n].t().to(dW2.scalar_type()));
    if (need_dx) dZ = at::matmul(W2.t(), dTm);  // (N, K, L)
  }
  const at::Tensor dx = need_dx ? fold_patches(g, dZ, x) : at::empty({0}, x.options());
  const auto acc = gamma.scalar_type();
  if (!apply_bn) {  // gamma and beta were not used
    sum_dyg.zero_();
    sum_dy.zero_();
  }
  return {dx, dW2.to(weight.scalar_type()).view(weight.sizes()), sum_dt.to(bias.scalar_type()), sum_dyg.to(acc),
          sum_dy.to(acc)};
}
}  // namespace

std::vector<at::Tensor> conv_act_bn_backward(const at::Tensor& dy_in, const at::Tensor& x, const at::Tensor& weight,
                                             const at::Tensor& bias, const at::Tensor& gamma, const at::Tensor& mean,
                                             const at::Tensor& rstd, const at::Tensor& t_saved,
                                             const at::Tensor& dmean, const at::Tensor& drstd, bool batch_stats,
                                             int64_t act, int64_t patch, bool apply_bn, bool need_dx) {
  return backward(dy_in, x, weight, bias, gamma, mean, rstd, t_saved, dmean, drstd, batch_stats, act, patch, apply_bn,
                  need_dx, apply_bn ? at::ScalarType::Undefined : x.scalar_type());
}

}  // namespace cpu
}  // namespace cmk
