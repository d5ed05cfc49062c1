// The machine's multiply-add peak as this backend can reach it: every thread runs independent chains of
// 64-byte-vector multiply-adds (enough chains to cover the latency), no memory traffic. The benchmarks
// report the depthwise block and the GEMMs against these figures rather than against one library's rate.
#include "fma_peak.h"

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <atomic>
#include <chrono>

#include "simd.h"

namespace cmk {
namespace cpu {
namespace {

constexpr int kChains = 12;  // > latency (4-6) x ports (1-2) on current x86 cores

// GFLOP/s of `iters` rounds of kChains step(a) per thread; flops_per_step per lane of a.
template <typename Step>
double chain_peak(int64_t iters, double flops_per_step, Step step) {
  using Vec = Simd<float>;
  using V = Vec::V;
  const int threads = at::get_num_threads();
  std::atomic<double> sink{0.0};
  const auto t0 = std::chrono::steady_clock::now();
  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t th = begin; th < end; ++th) {
      V a[kChains];
      for (int i = 0; i < kChains; ++i) a[i] = Vec::broadcast(1.0f + 1e-3f * static_cast<float>(i + th));
      for (int64_t it = 0; it < iters; ++it) {
#pragma GCC unroll 12
        for (int i = 0; i < kChains; ++i) a[i] = step(a[i]);
      }
      float s = 0;
      for (int i = 0; i < kChains; ++i) s += Vec::sum(a[i]);
      sink.store(sink.load() + s);
    }
  });
  const double sec = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  TORCH_CHECK(sink.load() == sink.load(), "fma_peak: NaN");  // keeps the chains live
  return flops_per_step * Vec::N * kChains * static_cast<double>(iters) * threads / sec / 1e9;
}

}  // namespace

double fma_peak_gflops(int64_t iters) {
  using Vec = Simd<float>;
  const Vec::V m = Vec::broadcast(0.999999f), c = Vec::broadcast(1e-6f);  // a stays near 1: no overflow
  return chain_peak(iters, 2.0, [=](Vec::V a) { return a * m + c; });
}

double bf16_dot_peak_gflops(int64_t iters) {
  TORCH_CHECK(kHasBf16Dot, "bf16_dot_peak: this build's target has no AVX512_BF16 dot products");
  // Pairs of 2^-20 (bf16 0x3580): each step adds 2 * 2^-40 to a lane that is near 1, so a neither grows
  // nor reaches a denormal (an inf or denormal operand slows the instruction down).
  const Bf16Pairs p = Bf16Pairs{} + 0x35803580u;
  return chain_peak(iters, 4.0, [=](Simd<float>::V a) { return dot_bf16_pairs(a, p, p); });
}

}  // namespace cpu
}  // namespace cmk
