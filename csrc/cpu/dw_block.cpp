// Fused depthwise block on the CPU:  y = x + gamma * (act(dwconv_k(x) + b) - mean) * rstd + beta.
//
// Work unit: a "plane" = one image n and one channel group (1 channel in NCHW, CB channels in
// channels_last, CB = one 64-byte vector of the accumulation type). A plane is copied once into a
// zero-padded buffer in the accumulation type (fp32 for fp32/bf16/fp16, fp64 for fp64), so the
// conv's inner loops are branch-free and compiler-vectorized: along w in NCHW, along c in
// channels_last. Outputs are register tiles of RB rows x WB columns x CB channels.
//
// Training threads own whole channel groups across the batch, so the per-channel statistics are
// complete inside one thread: no cross-thread merge, and t (or dt) stays in a per-thread scratch of
// N*H*W*CB values that lives in L2. Pass structure:
//   eval forward     : one pass over x (conv, bias, act, BN affine, residual).
//   training forward : conv+act into scratch, exact two-pass mean/var over the scratch, apply pass.
//   backward         : recompute t into scratch and reduce sum(dy), sum(dy*ghat); then form dt,
//                      dw, db and dx = dy + conv_transpose(dt) in one more pass.
// Only x and the per-channel statistics are saved for the backward (t is recomputed).

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "../common/block_math.h"
#include "dw_block.h"

namespace cmk {
namespace cpu {
namespace {

// Tile shape per layout: NCHW vectorizes along w (a 4 x VL tile), channels_last along c (1 x 4 x VL).
template <typename acc_t, bool CL>
struct TileShape {
  static constexpr int VL = 64 / sizeof(acc_t);
  static constexpr int CB = CL ? VL : 1;
  static constexpr int RB = CL ? 1 : 4;
  static constexpr int WB = CL ? 4 : VL;
};

inline int64_t round_up(int64_t a, int64_t b) { return (a + b - 1) / b * b; }

// Geometry shared by every plane of one call.
struct PlaneGeom {
  int64_t N, C, H, W, HW, k, pl;
  int64_t groups;        // channel groups
  int64_t buf_h, buf_w;  // padded buffer extent (rows rounded up to RB, cols to WB, plus k-1 halo)
};

template <typename acc_t, bool CL>
PlaneGeom make_geom(const at::Tensor& x, int64_t k) {
  using S = TileShape<acc_t, CL>;
  PlaneGeom g;
  g.N = x.size(0); g.C = x.size(1); g.H = x.size(2); g.W = x.size(3);
  g.HW = g.H * g.W; g.k = k; g.pl = (k - 1) / 2;
  g.groups = (g.C + S::CB - 1) / S::CB;
  g.buf_h = round_up(g.H, S::RB) + k - 1;
  g.buf_w = round_up(g.W, S::WB) + k - 1;
  return g;
}

// Offset of element (n, c, p = h*W + w) for either layout.
template <bool CL>
inline int64_t elem_offset(const PlaneGeom& g, int64_t n, int64_t c, int64_t p) {
  return CL ? (n * g.HW + p) * g.C + c : (n * g.C + c) * g.HW + p;
}

// Copy plane (n, group) of src into the zero-padded buffer with its top-left corner at (off, off).
template <typename scalar_t, typename acc_t, bool CL>
void load_padded(const PlaneGeom& g, const scalar_t* src, int64_t n, int64_t group, int64_t off, acc_t* buf) {
  constexpr int CB = TileShape<acc_t, CL>::CB;
  std::fill(buf, buf + g.buf_h * g.buf_w * CB, acc_t(0));
  const int64_t c0 = group * CB;
  const int64_t cb = std::min<int64_t>(CB, g.C - c0);
  for (int64_t h = 0; h < g.H; ++h) {
    acc_t* row = buf + ((h + off) * g.buf_w + off) * CB;
    const scalar_t* s = src + elem_offset<CL>(g, n, c0, h * g.W);
    if (CL) {
      for (int64_t w = 0; w < g.W; ++w)
        if (cb == CB) {
          for (int c = 0; c < CB; ++c) row[w * CB + c] = static_cast<acc_t>(s[w * g.C + c]);
        } else {
          for (int64_t c = 0; c < cb; ++c) row[w * CB + c] = static_cast<acc_t>(s[w * g.C + c]);
        }
    } else {
      for (int64_t w = 0; w < g.W; ++w) row[w] = static_cast<acc_t>(s[w]);
    }
  }
}

// Per-group weights laid out [tap][lane], lanes beyond C zero. flip=true gives w[k-1-i][k-1-j],
// the kernel of the transposed conv used for dx.
template <typename scalar_t, typename acc_t, bool CL>
std::vector<acc_t> group_weights(const PlaneGeom& g, const scalar_t* w, int64_t group, bool flip) {
  constexpr int CB = TileShape<acc_t, CL>::CB;
  const int64_t kk = g.k * g.k;
  std::vector<acc_t> out(kk * CB, acc_t(0));
  for (int64_t c = 0; c < CB && group * CB + c < g.C; ++c)
    for (int64_t t = 0; t < kk; ++t)
      out[t * CB + c] = static_cast<acc_t>(w[(group * CB + c) * kk + (flip ? kk - 1 - t : t)]);
  return out;
}

// Per-channel vector v[C] gathered into the group's lanes (zero beyond C).
template <typename acc_t, bool CL, typename T>
std::vector<acc_t> group_lanes(const PlaneGeom& g, const T* v, int64_t group) {
  constexpr int CB = TileShape<acc_t, CL>::CB;
  std::vector<acc_t> out(CB, acc_t(0));
  for (int64_t c = 0; c < CB && group * CB + c < g.C; ++c) out[c] = static_cast<acc_t>(v[group * CB + c]);
  return out;
}

// out[h][w][c] = bias[c] + sum_{i,j} wt[i*k+j][c] * buf[h+i][w+j][c]   (cross-correlation)
// for h < H, w < W; out is dense H x W x CB.
template <typename acc_t, bool CL>
void conv_plane(const PlaneGeom& g, const acc_t* buf, const acc_t* wt, const acc_t* bias, acc_t* out) {
  using S = TileShape<acc_t, CL>;
  constexpr int CB = S::CB, RB = S::RB, WB = S::WB;
  const int64_t row = g.buf_w * CB;
  for (int64_t h0 = 0; h0 < g.H; h0 += RB) {
    for (int64_t w0 = 0; w0 < g.W; w0 += WB) {
      acc_t acc[RB][WB][CB];
#pragma GCC unroll 16
      for (int r = 0; r < RB; ++r)
        for (int w = 0; w < WB; ++w)
          for (int c = 0; c < CB; ++c) acc[r][w][c] = bias[c];
      for (int64_t i = 0; i < g.k; ++i) {
        for (int64_t j = 0; j < g.k; ++j) {
          const acc_t* wv = wt + (i * g.k + j) * CB;
          const acc_t* in = buf + (h0 + i) * row + (w0 + j) * CB;
#pragma GCC unroll 16
          for (int r = 0; r < RB; ++r)
#pragma GCC unroll 16
            for (int w = 0; w < WB; ++w)
#pragma GCC unroll 64
              for (int c = 0; c < CB; ++c) acc[r][w][c] += wv[c] * in[r * row + w * CB + c];
        }
      }
      for (int r = 0; r < RB && h0 + r < g.H; ++r)
        for (int w = 0; w < WB && w0 + w < g.W; ++w)
          for (int c = 0; c < CB; ++c) out[((h0 + r) * g.W + w0 + w) * CB + c] = acc[r][w][c];
    }
  }
}

// Per-thread working memory, allocated once per parallel chunk.
template <typename acc_t, bool CL>
struct Scratch {
  std::vector<acc_t> pad, plane, batch;
  Scratch(const PlaneGeom& g, bool need_batch) {
    constexpr int CB = TileShape<acc_t, CL>::CB;
    pad.resize(g.buf_h * g.buf_w * CB);
    plane.resize(g.HW * CB);
    if (need_batch) batch.resize(g.N * g.HW * CB);
  }
};

template <typename scalar_t, bool CL>
void forward_impl(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& gamma,
                  const at::Tensor& beta, const at::Tensor& mean, const at::Tensor& rstd, bool batch_stats,
                  double eps, int64_t act, at::Tensor& y, at::Tensor& var) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int CB = TileShape<acc_t, CL>::CB;
  const PlaneGeom g = make_geom<acc_t, CL>(x, weight.size(2));
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const scalar_t* wp = weight.const_data_ptr<scalar_t>();
  const scalar_t* bp = bias.const_data_ptr<scalar_t>();
  const acc_t* gp = gamma.const_data_ptr<acc_t>();
  const acc_t* betap = beta.const_data_ptr<acc_t>();
  acc_t* meanp = mean.data_ptr<acc_t>();
  acc_t* rstdp = rstd.data_ptr<acc_t>();
  acc_t* varp = batch_stats ? var.data_ptr<acc_t>() : nullptr;
  scalar_t* yp = y.data_ptr<scalar_t>();

  dispatch_act(act, [&](auto ACT) {
    constexpr int A = decltype(ACT)::value;
    // y = x + scale*g + shift over one plane of g values (dense HW x CB).
    auto apply_plane = [&](int64_t n, int64_t group, const acc_t* gv, const acc_t* scale, const acc_t* shift) {
      const int64_t c0 = group * CB;
      const int64_t cb = std::min<int64_t>(CB, g.C - c0);
      for (int64_t p = 0; p < g.HW; ++p) {
        const int64_t o = elem_offset<CL>(g, n, c0, p);
        for (int64_t c = 0; c < cb; ++c)
          yp[o + c] = static_cast<scalar_t>(static_cast<acc_t>(xp[o + c]) + scale[c] * gv[p * CB + c] + shift[c]);
      }
    };
    auto affine = [&](int64_t group, std::vector<acc_t>& scale, std::vector<acc_t>& shift) {
      scale.assign(CB, acc_t(0));
      shift.assign(CB, acc_t(0));
      for (int64_t c = 0; c < CB && group * CB + c < g.C; ++c) {
        const int64_t ch = group * CB + c;
        scale[c] = gp[ch] * rstdp[ch];
        shift[c] = betap[ch] - meanp[ch] * scale[c];
      }
    };

    if (!batch_stats) {
      // Eval: planes are independent; one pass.
      at::parallel_for(0, g.N * g.groups, 1, [&](int64_t begin, int64_t end) {
        Scratch<acc_t, CL> s(g, false);
        std::vector<acc_t> scale, shift;
        for (int64_t idx = begin; idx < end; ++idx) {
          const int64_t n = idx / g.groups, group = idx % g.groups;
          const auto wt = group_weights<scalar_t, acc_t, CL>(g, wp, group, false);
          const auto bv = group_lanes<acc_t, CL>(g, bp, group);
          affine(group, scale, shift);
          load_padded<scalar_t, acc_t, CL>(g, xp, n, group, g.pl, s.pad.data());
          conv_plane<acc_t, CL>(g, s.pad.data(), wt.data(), bv.data(), s.plane.data());
          for (int64_t e = 0; e < g.HW * CB; ++e) s.plane[e] = act_forward<A>(s.plane[e]);
          apply_plane(n, group, s.plane.data(), scale.data(), shift.data());
        }
      });
      return;
    }

    // Training: each thread owns whole channel groups.
    const int64_t M = g.N * g.HW;
    at::parallel_for(0, g.groups, 1, [&](int64_t begin, int64_t end) {
      Scratch<acc_t, CL> s(g, true);
      std::vector<acc_t> scale, shift;
      for (int64_t group = begin; group < end; ++group) {
        const auto wt = group_weights<scalar_t, acc_t, CL>(g, wp, group, false);
        const auto bv = group_lanes<acc_t, CL>(g, bp, group);
        acc_t* G = s.batch.data();
        for (int64_t n = 0; n < g.N; ++n) {
          load_padded<scalar_t, acc_t, CL>(g, xp, n, group, g.pl, s.pad.data());
          acc_t* gn = G + n * g.HW * CB;
          conv_plane<acc_t, CL>(g, s.pad.data(), wt.data(), bv.data(), gn);
          for (int64_t e = 0; e < g.HW * CB; ++e) gn[e] = act_forward<A>(gn[e]);
        }
        // Exact two-pass statistics over the cached g (double sums), per lane.
        double sum[CB] = {0}, m2[CB] = {0};
        for (int64_t p = 0; p < M; ++p)
          for (int c = 0; c < CB; ++c) sum[c] += static_cast<double>(G[p * CB + c]);
        acc_t mu[CB];
        for (int c = 0; c < CB; ++c) mu[c] = static_cast<acc_t>(sum[c] / static_cast<double>(M));
        for (int64_t p = 0; p < M; ++p)
          for (int c = 0; c < CB; ++c) {
            const double d = static_cast<double>(G[p * CB + c] - mu[c]);
            m2[c] += d * d;
          }
        for (int64_t c = 0; c < CB && group * CB + c < g.C; ++c) {
          const int64_t ch = group * CB + c;
          const double var = m2[c] / static_cast<double>(M);
          meanp[ch] = mu[c];
          varp[ch] = static_cast<acc_t>(var);
          rstdp[ch] = static_cast<acc_t>(1.0 / std::sqrt(var + eps));
        }
        affine(group, scale, shift);
        for (int64_t n = 0; n < g.N; ++n) apply_plane(n, group, G + n * g.HW * CB, scale.data(), shift.data());
      }
    });
  });
}

template <typename scalar_t, bool CL>
void backward_impl(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                   const at::Tensor& gamma, const at::Tensor& mean, const at::Tensor& rstd, bool batch_stats,
                   int64_t act, at::Tensor& dx, at::Tensor& dweight, at::Tensor& dbias, at::Tensor& dgamma,
                   at::Tensor& dbeta) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int CB = TileShape<acc_t, CL>::CB;
  const PlaneGeom g = make_geom<acc_t, CL>(x, weight.size(2));
  const int64_t kk = g.k * g.k, pr = g.k - 1 - g.pl, M = g.N * g.HW;
  const scalar_t* dyp = dy.const_data_ptr<scalar_t>();
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const scalar_t* wp = weight.const_data_ptr<scalar_t>();
  const scalar_t* bp = bias.const_data_ptr<scalar_t>();
  const acc_t* gp = gamma.const_data_ptr<acc_t>();
  const acc_t* meanp = mean.const_data_ptr<acc_t>();
  const acc_t* rstdp = rstd.const_data_ptr<acc_t>();
  scalar_t* dxp = dx.data_ptr<scalar_t>();
  scalar_t* dwp = dweight.data_ptr<scalar_t>();
  scalar_t* dbp = dbias.data_ptr<scalar_t>();
  acc_t* dgp = dgamma.data_ptr<acc_t>();
  acc_t* dbetap = dbeta.data_ptr<acc_t>();

  dispatch_act(act, [&](auto ACT) {
    constexpr int A = decltype(ACT)::value;
    at::parallel_for(0, g.groups, 1, [&](int64_t begin, int64_t end) {
      Scratch<acc_t, CL> s(g, true);
      std::vector<acc_t> dtpad(s.pad.size());
      std::vector<acc_t> zero(CB, acc_t(0));
      for (int64_t group = begin; group < end; ++group) {
        const int64_t c0 = group * CB, cb = std::min<int64_t>(CB, g.C - c0);
        const auto wt = group_weights<scalar_t, acc_t, CL>(g, wp, group, false);
        const auto wflip = group_weights<scalar_t, acc_t, CL>(g, wp, group, true);
        const auto bv = group_lanes<acc_t, CL>(g, bp, group);
        const auto mu = group_lanes<acc_t, CL>(g, meanp, group);
        const auto rs = group_lanes<acc_t, CL>(g, rstdp, group);
        const auto ga = group_lanes<acc_t, CL>(g, gp, group);
        acc_t* T = s.batch.data();

        // Pass 1: recompute t, reduce sum(dy) and sum(dy * ghat).
        double sdy[CB] = {0}, sdyg[CB] = {0};
        for (int64_t n = 0; n < g.N; ++n) {
          load_padded<scalar_t, acc_t, CL>(g, xp, n, group, g.pl, s.pad.data());
          acc_t* tn = T + n * g.HW * CB;
          conv_plane<acc_t, CL>(g, s.pad.data(), wt.data(), bv.data(), tn);
          for (int64_t p = 0; p < g.HW; ++p) {
            const int64_t o = elem_offset<CL>(g, n, c0, p);
            for (int64_t c = 0; c < cb; ++c) {
              const acc_t d = static_cast<acc_t>(dyp[o + c]);
              const acc_t gh = (act_forward<A>(tn[p * CB + c]) - mu[c]) * rs[c];
              sdy[c] += d;
              sdyg[c] += d * gh;
            }
          }
        }
        // dg = gamma*rstd*(dy - c1 - ghat*c2); training: c1 = mean(dy), c2 = mean(dy*ghat).
        acc_t a[CB], c1[CB], c2[CB];
        for (int c = 0; c < CB; ++c) {
          a[c] = ga[c] * rs[c];
          c1[c] = batch_stats ? static_cast<acc_t>(sdy[c] / static_cast<double>(M)) : acc_t(0);
          c2[c] = batch_stats ? static_cast<acc_t>(sdyg[c] / static_cast<double>(M)) : acc_t(0);
        }

        // Pass 2: dt, db, dw, dx.
        std::vector<double> dwacc(kk * CB, 0.0);
        double dbacc[CB] = {0};
        const int64_t row = g.buf_w * CB;
        for (int64_t n = 0; n < g.N; ++n) {
          const acc_t* tn = T + n * g.HW * CB;
          // dt into the dx buffer, placed so that conv with the flipped kernel gives conv_transpose.
          std::fill(dtpad.begin(), dtpad.end(), acc_t(0));
          for (int64_t h = 0; h < g.H; ++h)
            for (int64_t w = 0; w < g.W; ++w) {
              const int64_t p = h * g.W + w;
              const int64_t o = elem_offset<CL>(g, n, c0, p);
              acc_t* dst = dtpad.data() + (h + pr) * row + (w + pr) * CB;
              for (int64_t c = 0; c < cb; ++c) {
                const acc_t t = tn[p * CB + c];
                const acc_t gh = (act_forward<A>(t) - mu[c]) * rs[c];
                const acc_t dt = a[c] * (static_cast<acc_t>(dyp[o + c]) - c1[c] - gh * c2[c]) * act_backward<A>(t);
                dst[c] = dt;
                dbacc[c] += dt;
              }
            }
          // dw[c,i,j] += sum_{h,w} dt[h,w] * xpad[h+i, w+j]
          load_padded<scalar_t, acc_t, CL>(g, xp, n, group, g.pl, s.pad.data());
          for (int64_t i = 0; i < g.k; ++i)
            for (int64_t j = 0; j < g.k; ++j) {
              acc_t part[CB] = {0};
              for (int64_t h = 0; h < g.H; ++h) {
                const acc_t* d = dtpad.data() + (h + pr) * row + pr * CB;
                const acc_t* xr = s.pad.data() + (h + i) * row + j * CB;
                if (CB == 1) {
                  acc_t sacc = 0;
#pragma omp simd reduction(+ : sacc)
                  for (int64_t w = 0; w < g.W; ++w) sacc += d[w] * xr[w];
                  part[0] += sacc;
                } else {
                  for (int64_t w = 0; w < g.W; ++w)
                    for (int c = 0; c < CB; ++c) part[c] += d[w * CB + c] * xr[w * CB + c];
                }
              }
              for (int c = 0; c < CB; ++c) dwacc[(i * g.k + j) * CB + c] += part[c];
            }
          // dx = dy + conv(dtpad, flipped w)
          conv_plane<acc_t, CL>(g, dtpad.data(), wflip.data(), zero.data(), s.plane.data());
          for (int64_t p = 0; p < g.HW; ++p) {
            const int64_t o = elem_offset<CL>(g, n, c0, p);
            for (int64_t c = 0; c < cb; ++c)
              dxp[o + c] = static_cast<scalar_t>(static_cast<acc_t>(dyp[o + c]) + s.plane[p * CB + c]);
          }
        }
        for (int64_t c = 0; c < cb; ++c) {
          const int64_t ch = c0 + c;
          for (int64_t t = 0; t < kk; ++t) dwp[ch * kk + t] = static_cast<scalar_t>(dwacc[t * CB + c]);
          dbp[ch] = static_cast<scalar_t>(dbacc[c]);
          dgp[ch] = static_cast<acc_t>(sdyg[c]);
          dbetap[ch] = static_cast<acc_t>(sdy[c]);
        }
      }
    });
  });
}

}  // namespace

std::vector<at::Tensor> dw_block_forward(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                                         const at::Tensor& gamma, const at::Tensor& beta, const at::Tensor& mean,
                                         const at::Tensor& rstd, bool batch_stats, double eps, int64_t act) {
  check_dw_inputs(x, weight, bias, gamma, beta, mean, rstd, batch_stats);
  const bool cl = is_channels_last(x);
  const auto acc_opts = gamma.options();
  at::Tensor y = poisoned(at::empty_like(x));  // preserves x's strides (the fake impl does the same)
  at::Tensor mean_out = batch_stats ? poisoned(at::empty({x.size(1)}, acc_opts)) : mean.contiguous();
  at::Tensor rstd_out = batch_stats ? poisoned(at::empty({x.size(1)}, acc_opts)) : rstd.contiguous();
  at::Tensor var_out = batch_stats ? poisoned(at::empty({x.size(1)}, acc_opts)) : at::empty({0}, acc_opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "dw_block_forward_cpu", [&] {
    if (cl)
      forward_impl<scalar_t, true>(x, weight.contiguous(), bias, gamma, beta, mean_out, rstd_out, batch_stats, eps, act, y, var_out);
    else
      forward_impl<scalar_t, false>(x, weight.contiguous(), bias, gamma, beta, mean_out, rstd_out, batch_stats, eps, act, y, var_out);
  });
  if (!batch_stats) return {y, at::empty({0}, acc_opts), at::empty({0}, acc_opts), var_out};
  return {y, mean_out, rstd_out, var_out};
}

std::vector<at::Tensor> dw_block_backward(const at::Tensor& dy_in, const at::Tensor& x, const at::Tensor& weight,
                                          const at::Tensor& bias, const at::Tensor& gamma, const at::Tensor& mean,
                                          const at::Tensor& rstd, bool batch_stats, int64_t act) {
  check_dw_inputs(x, weight, bias, gamma, gamma, mean, rstd, false);
  const bool cl = is_channels_last(x);
  const auto fmt = cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  TORCH_CHECK(dy_in.sizes() == x.sizes(), "dw_block_backward: grad_output has shape ", dy_in.sizes(),
              " but x has shape ", x.sizes());
  TORCH_CHECK(dy_in.scalar_type() == x.scalar_type(), "dw_block_backward: grad_output dtype ", dy_in.scalar_type(),
              " differs from x dtype ", x.scalar_type());
  const at::Tensor dy = dy_in.contiguous(fmt);
  at::Tensor dx = poisoned(at::empty_like(x));
  at::Tensor dweight = poisoned(at::empty_like(weight, weight.options(), at::MemoryFormat::Contiguous));
  at::Tensor dbias = poisoned(at::empty_like(bias));
  at::Tensor dgamma = poisoned(at::empty_like(gamma));
  at::Tensor dbeta = poisoned(at::empty_like(gamma));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "dw_block_backward_cpu", [&] {
    if (cl)
      backward_impl<scalar_t, true>(dy, x, weight.contiguous(), bias, gamma, mean, rstd, batch_stats, act, dx, dweight,
                                    dbias, dgamma, dbeta);
    else
      backward_impl<scalar_t, false>(dy, x, weight.contiguous(), bias, gamma, mean, rstd, batch_stats, act, dx,
                                     dweight, dbias, dgamma, dbeta);
  });
  return {dx, dweight, dbias, dgamma, dbeta};
}

}  // namespace cpu
}  // namespace cmk
