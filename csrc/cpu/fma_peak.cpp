// The machine's fp32 FMA peak as this backend can reach it: every thread runs independent chains of
// 64-byte-vector FMAs (enough chains to cover the FMA latency), no memory traffic. The benchmarks
// report the depthwise block and the GEMMs against this figure rather than against one library's rate.
#include "fma_peak.h"

#include <ATen/Parallel.h>

#include <atomic>
#include <chrono>

#include "simd.h"

namespace cmk {
namespace cpu {

double fma_peak_gflops(int64_t iters) {
  using Vec = Simd<float>;
  using V = Vec::V;
  constexpr int kChains = 12;  // > latency (4) x FMA ports (2) on current x86 cores
  const int threads = at::get_num_threads();
  std::atomic<double> sink{0.0};
  const auto t0 = std::chrono::steady_clock::now();
  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t th = begin; th < end; ++th) {
      V a[kChains];
      for (int i = 0; i < kChains; ++i) a[i] = Vec::broadcast(1.0f + 1e-3f * static_cast<float>(i + th));
      const V m = Vec::broadcast(0.999999f), c = Vec::broadcast(1e-6f);  // a stays near 1: no overflow
      for (int64_t it = 0; it < iters; ++it) {
#pragma GCC unroll 12
        for (int i = 0; i < kChains; ++i) a[i] = a[i] * m + c;
      }
      float s = 0;
      for (int i = 0; i < kChains; ++i) s += Vec::sum(a[i]);
      sink.store(sink.load() + s);
    }
  });
  const double sec = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  TORCH_CHECK(sink.load() == sink.load(), "fma_peak: NaN");  // keeps the chains live
  return 2.0 * Vec::N * kChains * static_cast<double>(iters) * threads / sec / 1e9;
}

}  // namespace cpu
}  // namespace cmk
