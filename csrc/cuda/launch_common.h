// Launcher-side helpers shared by csrc/cuda/*_launch.cpp: device checks, the current stream, the
// dtype tag and the block geometry, for the GPU build and (CMK_CUDA_EMULATION) the host emulation.
#pragma once

#include <ATen/ATen.h>
#if !defined(CMK_CUDA_EMULATION)
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#endif

#include "../cpu/cpu_common.h"  // poisoned(), is_channels_last()
#include "kernel_api.h"

namespace cmk {
namespace CMK_KNS {

#if defined(CMK_CUDA_EMULATION)
constexpr const char* kBackendName = "cuda_emu";
inline bool on_backend_device(const at::Tensor& t) { return t.device().is_cpu(); }
inline void* current_stream(const at::Tensor&) { return nullptr; }
struct DeviceGuard {
  explicit DeviceGuard(const at::Tensor&) {}
};
#else
constexpr const char* kBackendName = "cuda";
inline bool on_backend_device(const at::Tensor& t) { return t.device().is_cuda(); }
inline void* current_stream(const at::Tensor& t) {
  return at::cuda::getCurrentCUDAStream(t.device().index()).stream();
}
struct DeviceGuard {
  explicit DeviceGuard(const at::Tensor& t) : guard(t.device()) {}
  c10::cuda::CUDAGuard guard;
};
#endif

inline void check_on_device(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(on_backend_device(t), op, " (", kBackendName, " backend): ", name, " must be a ",
              kBackendName == std::string("cuda") ? "CUDA" : "CPU", " tensor, got ", t.device());
}

inline ScalarKind scalar_kind(const char* op, at::ScalarType s) {
  switch (s) {
    case at::kFloat: return ScalarKind::kFloat;
    case at::kHalf: return ScalarKind::kHalf;
    case at::kBFloat16: return ScalarKind::kBFloat16;
    case at::kDouble: return ScalarKind::kDouble;
    default:
      TORCH_CHECK(false, op, " (", kBackendName, " backend): unsupported dtype ", s,
                  " (float32, float16, bfloat16, float64)");
  }
}

inline void check_activation(const char* op, const at::Tensor& x) {
  check_on_device(op, "input", x);
  TORCH_CHECK(x.dim() == 4, op, ": input must be 4-D (N, C, H, W), got shape ", x.sizes());
  TORCH_CHECK(x.is_contiguous() || x.is_contiguous(at::MemoryFormat::ChannelsLast), op,
              ": input must be contiguous in NCHW or channels_last");
  scalar_kind(op, x.scalar_type());
}

// The accumulation dtype of an input: float64 for float64, float32 otherwise. Every per-channel tensor
// (statistics, BN parameters, input affine) is in it.
inline at::ScalarType acc_dtype(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_per_channel(const char* op, const char* name, const at::Tensor& t, int64_t C, at::ScalarType acc) {
  check_on_device(op, name, t);
  TORCH_CHECK(t.dim() == 1 && t.size(0) == C && t.is_contiguous(), op, ": ", name,
              " must be a contiguous 1-D tensor of ", C, " elements, got shape ", t.sizes());
  TORCH_CHECK(t.scalar_type() == acc, op, ": ", name, " must be ", acc, " (the accumulation dtype of the input), got ",
              t.scalar_type());
}

// f(A{}) with A the C++ accumulation type of dtype acc (acc_dtype).
template <typename F>
decltype(auto) with_acc_type(at::ScalarType acc, F&& f) {
  if (acc == at::kDouble) return f(double{});
  return f(float{});
}

// A pointer to t's data as A, or null for an undefined or empty t (an absent optional input, or an output the
// call does not make); the mutable form is for outputs.
template <typename A>
const A* data_or_null(const at::Tensor& t) {
  return t.defined() && t.numel() > 0 ? t.const_data_ptr<A>() : nullptr;
}
template <typename A>
A* mutable_data_or_null(const at::Tensor& t) {
  return t.defined() && t.numel() > 0 ? t.data_ptr<A>() : nullptr;
}

inline Problem make_problem(const at::Tensor& x, int64_t C, int64_t H, int64_t W, int64_t act) {
  TORCH_CHECK(act >= 0 && act <= 2, "convmixer_kernels: unknown activation code ", act,
              " (0=gelu, 1=gelu_tanh, 2=relu)");
  return Problem{x.size(0), C, H, W, cpu::is_channels_last(x), scalar_kind("convmixer_kernels", x.scalar_type()),
                 static_cast<int>(act)};
}

// Block geometry. GPU: 256 threads, 32 channel lanes in channels_last, ~2048 blocks per reduction,
// 16x16 NCHW / 8x8x8 channels_last backward tiles, 32x32 tiles of the tiled forward conv, 16x16 of the tiled backward. Emulation: one
// warp per block and small tiles and
// splits, so that tile and split remainders occur on tiny test shapes.
inline LaunchShape launch_shape(const Problem& p) {
#if defined(CMK_CUDA_EMULATION)
  (void)p;
  return LaunchShape{32, 4, 3, 4, 4, 4, 2, 4, 8, 4, 8};
#else
  const int cpb = p.channels_last ? 32 : 1;
  const int64_t groups = (p.C + cpb - 1) / cpb;
  const int splits = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(65535, 2048 / groups)));
  return p.channels_last ? LaunchShape{256, cpb, splits, 4096, 8, 8, 8, 32, 32, 16, 16}
                         : LaunchShape{256, cpb, splits, 4096, 16, 16, 1, 32, 32, 16, 16};
#endif
}

inline at::Tensor workspace(const at::Tensor& like, int64_t elems, at::ScalarType acc) {
  return at::empty({std::max<int64_t>(elems, 1)}, like.options().dtype(acc));
}

}  // namespace CMK_KNS
}  // namespace cmk
