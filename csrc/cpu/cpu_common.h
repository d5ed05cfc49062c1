// Helpers shared by the CPU fused blocks: input checks, layout and activation dispatch.
#pragma once

#include <ATen/ATen.h>

#include <limits>
#include <type_traits>

#include "../common/block_math.h"
#include "simd.h"

namespace cmk {
namespace cpu {

// Calls f(std::integral_constant<int, ACT>) so the activation is a compile-time constant inside
// the vectorized loops.
template <typename F>
void dispatch_act(int64_t act, F&& f) {
  switch (act) {
    case kGelu: f(std::integral_constant<int, kGelu>{}); break;
    case kGeluTanh: f(std::integral_constant<int, kGeluTanh>{}); break;
    case kRelu: f(std::integral_constant<int, kRelu>{}); break;
    default: TORCH_CHECK(false, "convmixer_kernels: unknown activation code ", act, " (0=gelu, 1=gelu_tanh, 2=relu)");
  }
}

// A tensor dense in channels_last but not in NCHW. Tensors dense in both (C == 1 or H == W == 1)
// take the NCHW path, whose offsets coincide with channels_last ones on such shapes.
inline bool is_channels_last(const at::Tensor& x) {
  return !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast);
}

inline void check_per_channel(const char* op, const char* name, const at::Tensor& t, int64_t C,
                              at::ScalarType acc) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == C && t.is_contiguous(), op, ": ", name,
              " must be a contiguous 1-D tensor of ", C, " elements, got shape ", t.sizes());
  TORCH_CHECK(t.scalar_type() == acc, op, ": ", name, " must be ", acc, ", got ", t.scalar_type());
}

// Test hook: when set, every output a launcher allocates is NaN-filled first, so an element a kernel
// forgets to write fails the numerics tests instead of passing by luck.
inline bool& poison_outputs_flag() {
  static bool flag = false;
  return flag;
}
inline at::Tensor poisoned(at::Tensor t) {
  if (poison_outputs_flag() && t.is_floating_point()) t.fill_(std::numeric_limits<double>::quiet_NaN());
  return t;
}

inline at::ScalarType acc_type_for(at::ScalarType s) {
  return s == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_activation_tensor(const char* op, const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu(), op, ": input must be a CPU tensor, got ", x.device());
  TORCH_CHECK(x.dim() == 4, op, ": input must be 4-D (N, C, H, W), got ", x.dim(), "-D shape ", x.sizes());
  TORCH_CHECK(x.is_contiguous() || x.is_contiguous(at::MemoryFormat::ChannelsLast), op,
              ": input must be contiguous in NCHW or channels_last");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble || x.scalar_type() == at::kBFloat16 ||
                  x.scalar_type() == at::kHalf,
              op, ": unsupported dtype ", x.scalar_type());
}

// Few values per channel (M = N*H*W) make BatchNorm's training gradient ill-conditioned: dg =
// a*(dy - mean(dy) - ghat*mean(dy*ghat)) nearly cancels, and db = sum dg*act'(t), dw = sum dg*act'(t)*x
// cancel again (sum dg = 0), so the fp32 rounding of t, g and act'(t) (noise of ~1 ulp each, amplified
// by rstd and the cancellations) is most of the result. Even correctly rounded fp32 intermediates then
// land on either side of 2x PyTorch's own fp32 error (which is noise of the same size) from case to case.
// So at these counts the training passes run the same kernels in double and round once at the end:
// exact up to that rounding, and cheap at this size (the double kernels are about half the fp32 rate).
constexpr int64_t kExactTrainingMaxCount = 512;
inline bool use_exact_training(at::ScalarType dtype, bool batch_stats, int64_t count) {
  return batch_stats && dtype != at::kDouble && count <= kExactTrainingMaxCount;
}
inline at::Tensor to_double(const at::Tensor& t) { return t.to(at::kDouble); }

// act(t) (or act'(t) with BACKWARD) of every lane of one vector, by the scalar formulas of block_math.h.
// For the loops that run over whole vectors: written per element inside them, GCC vectorized those loops
// across pixels instead, through lane permutes and stack spills (perf: the backward's pass-1 sums alone were
// ~11% of its samples on an AVX2 Zen 3).
// ReLU is written on the whole vector: per lane, GCC compiled its branch to a compare and cmov per lane
// and eight 4-byte stores read back as one vector (a failed store forward), ~2 ms of a 13 ms GEMM
// epilogue at ConvMixer-256/8's shape. Same values as act_forward/act_backward (NaN kept, -0 -> +0).
template <int A, bool BACKWARD, typename acc_t>
inline typename Simd<acc_t>::V act_lanes(typename Simd<acc_t>::V t) {
  using V = typename Simd<acc_t>::V;
  if constexpr (A == kRelu) {
    if constexpr (BACKWARD)
      return t > acc_t(0) ? V{} + acc_t(1) : (t != t ? t : V{});
    else
      return t <= acc_t(0) ? V{} : t;
  }
  alignas(kVecBytes) acc_t v[Simd<acc_t>::N];
  Simd<acc_t>::store(v, t);
  for (int c = 0; c < Simd<acc_t>::N; ++c) v[c] = BACKWARD ? act_backward<A>(v[c]) : act_forward<A>(v[c]);
  return Simd<acc_t>::load(v);
}

}  // namespace cpu
}  // namespace cmk
