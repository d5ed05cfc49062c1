#include "sgemm.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstring>

#include "cpu_common.h"
#include "simd.h"

namespace cmk {
namespace cpu {
namespace {

using Vec = Simd<float>;
using V = Vec::V;
constexpr int NR = 2 * Vec::N;  // columns of the register tile: two vectors (16 on AVX2)
constexpr int MR = 6;           // rows: 6 x 2 accumulators + 2 of W + 1 broadcast of X = 15 of 16 ymm
// Output columns per sweep: a thread keeps its 6 rows of X (6 K floats, L1) while it walks NC columns of
// packed W (K x NC floats, L2 or the shared L3). 64-768 measured within noise of one another at K = 256
// and 768 (Zen 3); K blocks of 256 did not help either (benchmarks/RESULTS.md).
constexpr int64_t NC = 256;

// W^T in panels of NR columns: Wp[p][k][j] = W[p*NR + j][k], zero past N, so the kernel reads one
// contiguous run of NR floats per k and a partial last panel computes (and then drops) zero columns.
// The loop along W's unit stride is the inner one: row by row for W (N, K), k by k for a W^T view
// (w_sn = 1, the backward's dZ = dT W). On a W^T view, row by row read each element from a new line:
// 7.4-8.1 ms against 3.0-4.1 for a whole 64 x 1536 x 1536 GEMM (Zen 3, 2 threads, alternated runs); on
// W, k by k was the slower in the first round (4.3-5.3 against 3.3-4.8 ms).
void pack_wt(const float* W, int64_t w_sn, int64_t w_sk, int64_t N, int64_t K, float* Wp) {
  const int64_t panels = (N + NR - 1) / NR;
  at::parallel_for(0, panels, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      float* dst = Wp + p * K * NR;
      const int64_t cols = std::min<int64_t>(NR, N - p * NR);
      const float* src = W + p * NR * w_sn;
      if (w_sk == 1 && w_sn != 1) {
        for (int64_t j = 0; j < cols; ++j)
          for (int64_t k = 0; k < K; ++k) dst[k * NR + j] = src[j * w_sn + k];
      } else {
        for (int64_t k = 0; k < K; ++k)
          for (int64_t j = 0; j < cols; ++j) dst[k * NR + j] = src[j * w_sn + k * w_sk];
      }
      for (int64_t k = 0; k < K; ++k)
        for (int64_t j = cols; j < NR; ++j) dst[k * NR + j] = 0.f;
    }
  });
}

// Per-channel epilogue vectors padded to whole panels (zeros past N), so a partial panel loads them whole.
struct PaddedEpilogue {
  std::vector<float> bias, scale, shift;
  const float* b = nullptr;
  const float* sc = nullptr;
  const float* sh = nullptr;
  PaddedEpilogue(const GemmEpilogue& e, int64_t N) {
    const int64_t Np = (N + NR - 1) / NR * NR;
    const auto pad = [&](const float* src, std::vector<float>& dst) -> const float* {
      if (!src) return nullptr;
      dst.assign(Np, 0.f);
      std::memcpy(dst.data(), src, N * sizeof(float));
      return dst.data();
    };
    b = pad(e.bias, bias);
    sc = pad(e.scale, scale);
    sh = pad(e.shift, shift);
  }
};

// One register tile: rows [0, R) of X (row stride ldx) times one packed panel, over all of K, then the
// epilogue, then the store of the first `cols` columns (NR but in the last panel). acc[i][v] is
// sum_k X[i][k] Wp[k][v*N .. v*N + N): each k costs two loads of W, R broadcasts of X and 2R FMAs,
// all operands in L1 or L2.
// Summation order: the registers sum KB consecutive k, and those chunk sums are added to a total kept
// in L1. One register run over all of K was 2.7x MKL's error at K = 300 (each output's rounding grows
// with the length of the run it is summed in, ~K ulp), beyond the numerics rule; chunks bound that run
// to KB + K/KB terms, for 2R loads and adds per KB k (~3% of the FMAs at KB = 64).
constexpr int64_t KB = 64;

template <int R, int ACT>
inline void tile(const float* X, int64_t ldx, const float* Wp, int64_t K, const PaddedEpilogue& e, int64_t n0,
                 float* Y, int64_t ldy, int cols) {
  V tot0[R], tot1[R];
  for (int64_t k0 = 0; k0 < K || k0 == 0; k0 += KB) {
    V acc0[R], acc1[R];
#pragma GCC unroll 6
    for (int i = 0; i < R; ++i) acc0[i] = acc1[i] = V{};
    const int64_t k1 = std::min(K, k0 + KB);
    for (int64_t k = k0; k < k1; ++k) {
      const V w0 = Vec::load(Wp + k * NR), w1 = Vec::load(Wp + k * NR + Vec::N);
#pragma GCC unroll 6
      for (int i = 0; i < R; ++i) {
        const V x = Vec::broadcast(X[i * ldx + k]);
        acc0[i] += x * w0;
        acc1[i] += x * w1;
      }
    }
#pragma GCC unroll 6
    for (int i = 0; i < R; ++i) {
      tot0[i] = k0 == 0 ? acc0[i] : tot0[i] + acc0[i];
      tot1[i] = k0 == 0 ? acc1[i] : tot1[i] + acc1[i];
    }
  }
  const auto finish = [&](V t, int64_t c) {
    if (e.b) t += Vec::load(e.b + c);
    if constexpr (ACT >= 0) t = act_lanes<ACT, false, float>(t);
    if (e.sc) t *= Vec::load(e.sc + c);
    if (e.sh) t += Vec::load(e.sh + c);
    return t;
  };
#pragma GCC unroll 6
  for (int i = 0; i < R; ++i) {
    const V y0 = finish(tot0[i], n0), y1 = finish(tot1[i], n0 + Vec::N);
    float* row = Y + i * ldy + n0;
    if (cols == NR) {
      Vec::store(row, y0);
      Vec::store(row + Vec::N, y1);
    } else {
      alignas(kVecBytes) float tmp[NR];
      Vec::store(tmp, y0);
      Vec::store(tmp + Vec::N, y1);
      std::memcpy(row, tmp, cols * sizeof(float));
    }
  }
}

template <int ACT>
void sgemm_rows(const float* X, int64_t ldx, const float* Wp, float* Y, int64_t M, int64_t N, int64_t K,
                const PaddedEpilogue& e) {
  const int64_t tiles = (M + MR - 1) / MR;
  at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t c0 = 0; c0 < N; c0 += NC) {
      const int64_t c1 = std::min(N, c0 + NC);
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t m = t * MR;
        const int rows = static_cast<int>(std::min<int64_t>(MR, M - m));
        const float* Xt = X + m * ldx;
        float* Yt = Y + m * N;
        for (int64_t n = c0; n < c1; n += NR) {
          const float* Wpn = Wp + (n / NR) * K * NR;
          const int cols = static_cast<int>(std::min<int64_t>(NR, N - n));
          switch (rows) {
            case 6: tile<6, ACT>(Xt, ldx, Wpn, K, e, n, Yt, N, cols); break;
            case 5: tile<5, ACT>(Xt, ldx, Wpn, K, e, n, Yt, N, cols); break;
            case 4: tile<4, ACT>(Xt, ldx, Wpn, K, e, n, Yt, N, cols); break;
            case 3: tile<3, ACT>(Xt, ldx, Wpn, K, e, n, Yt, N, cols); break;
            case 2: tile<2, ACT>(Xt, ldx, Wpn, K, e, n, Yt, N, cols); break;
            default: tile<1, ACT>(Xt, ldx, Wpn, K, e, n, Yt, N, cols); break;
          }
        }
      }
    }
  });
}

#if defined(__FMA__) && !defined(__AVX512F__)
constexpr bool kOwnByDefault = true;
#else
constexpr bool kOwnByDefault = false;
#endif

std::atomic<bool>& own_selected() {
  static std::atomic<bool> own{kOwnByDefault};
  return own;
}

}  // namespace

void sgemm_nt(const float* X, int64_t ldx, const float* W, int64_t w_sn, int64_t w_sk, float* Y, int64_t M,
              int64_t N, int64_t K, const GemmEpilogue& epilogue) {
  if (M == 0 || N == 0) return;
  // The c10 CPU allocator aligns to 64 bytes, so every W load of the kernel sits inside one cache line.
  const at::Tensor Wp_buf = at::empty({(N + NR - 1) / NR * NR * K}, at::TensorOptions().dtype(at::kFloat));
  float* Wp = Wp_buf.mutable_data_ptr<float>();
  pack_wt(W, w_sn, w_sk, N, K, Wp);
  const PaddedEpilogue e(epilogue, N);
  if (epilogue.act < 0)
    sgemm_rows<-1>(X, ldx, Wp, Y, M, N, K, e);
  else
    dispatch_act(epilogue.act, [&](auto A) { sgemm_rows<decltype(A)::value>(X, ldx, Wp, Y, M, N, K, e); });
}

at::Tensor sgemm_nt(const at::Tensor& X, const at::Tensor& W, const GemmEpilogue& epilogue) {
  TORCH_CHECK(X.dim() == 2 && W.dim() == 2 && X.size(1) == W.size(1), "convmixer_kernels sgemm_nt: X (M, K) and ",
              "W (N, K) expected, got ", X.sizes(), " and ", W.sizes());
  TORCH_CHECK(X.scalar_type() == at::kFloat && W.scalar_type() == at::kFloat && X.device().is_cpu() &&
                  W.device().is_cpu(),
              "convmixer_kernels sgemm_nt: fp32 CPU tensors expected");
  const at::Tensor Xd = X.stride(1) == 1 && X.stride(0) >= X.size(1) ? X : X.contiguous();
  at::Tensor Y = poisoned(at::empty({X.size(0), W.size(0)}, X.options()));
  sgemm_nt(Xd.const_data_ptr<float>(), Xd.stride(0), W.const_data_ptr<float>(), W.stride(0), W.stride(1),
           Y.mutable_data_ptr<float>(), X.size(0), W.size(0), X.size(1), epilogue);
  return Y;
}

bool own_sgemm_selected() { return own_selected().load(); }

void set_cpu_gemm(const std::string& route) {
  TORCH_CHECK(route == "own" || route == "onednn", "convmixer_kernels: set_cpu_gemm takes \"own\" or \"onednn\", got \"",
              route, "\"");
  own_selected() = route == "own";
}

std::string cpu_gemm() { return own_sgemm_selected() ? "own" : "onednn"; }

}  // namespace cpu
}  // namespace cmk
