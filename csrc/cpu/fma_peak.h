#pragma once

#include <cstdint>

namespace cmk {
namespace cpu {

// GFLOP/s of fp32 FMAs over at::get_num_threads() threads, each running `iters` rounds of 12
// independent vector FMAs (fma_peak.cpp).
double fma_peak_gflops(int64_t iters);

// The same with bf16 pair dots (vdpbf16ps: 2 multiply-adds per fp32 lane); raises where the build's
// target has none.
double bf16_dot_peak_gflops(int64_t iters);

}  // namespace cpu
}  // namespace cmk
