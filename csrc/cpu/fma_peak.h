#pragma once

#include <cstdint>

namespace cmk {
namespace cpu {

// GFLOP/s of fp32 FMAs over at::get_num_threads() threads, each running `iters` rounds of 12
// independent vector FMAs (fma_peak.cpp).
double fma_peak_gflops(int64_t iters);

}  // namespace cpu
}  // namespace cmk
