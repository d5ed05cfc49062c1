// Device-side helpers shared by the CUDA fused blocks: the compile mode (nvcc, or host C++ under the
// emulator), dtype conversions, 16-byte packs, the tensor layout, and the block/warp reductions of
// per-channel partials. The formulas themselves (activations, Welford merge) live in
// ../common/block_math.h. No torch headers here: nvcc stays fast.
#pragma once

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <type_traits>

#if defined(CMK_CUDA_EMULATION)
#include "../cuda_emu/cuda_emu.h"
#define CMK_DEV inline
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>
#define CMK_DEV __device__ __forceinline__
#define CMK_DYNAMIC_SHARED(type, name)                      \
  extern __shared__ __align__(16) unsigned char cmk_smem_[]; \
  type* name = reinterpret_cast<type*>(cmk_smem_)
#define CMK_LAUNCH(kernel, grid, block, smem, stream, ...) \
  kernel<<<(grid), (block), (smem), static_cast<cudaStream_t>(stream)>>>(__VA_ARGS__)
#define CMK_CHECK_LAUNCH(what)                                                                     \
  do {                                                                                             \
    const cudaError_t cmk_err_ = cudaGetLastError();                                               \
    if (cmk_err_ != cudaSuccess)                                                                   \
      throw std::runtime_error(std::string("convmixer_kernels: CUDA launch of ") + (what) +         \
                               " failed: " + cudaGetErrorString(cmk_err_));                        \
  } while (0)
#endif

#include "../common/block_math.h"
#include "kernel_api.h"

namespace cmk {
namespace CMK_KNS {

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kWarp = 32;

// --- dtype conversions ------------------------------------------------------------------------------
// The accumulation type: fp32 for fp32/fp16/bf16 inputs, fp64 for fp64 (which the launchers also use for
// training with few values per channel, cpu::use_exact_training: the same kernels, rounded once at the end).
template <typename T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};
template <typename T>
using acc_of = typename AccOf<T>::type;
// Whether T has the tiled depthwise kernels (fp32 shared-memory tiles); fp64 runs the generic ones.
template <typename T>
constexpr bool has_tiled_kernels() {
  return !std::is_same<T, double>::value;
}

CMK_DEV float to_acc(float v) { return v; }
CMK_DEV double to_acc(double v) { return v; }
#if defined(CMK_CUDA_EMULATION)
CMK_DEV float to_acc(__half v) { return static_cast<float>(v); }
CMK_DEV float to_acc(__nv_bfloat16 v) { return static_cast<float>(v); }
template <typename T, typename A>
CMK_DEV T from_acc(A v) { return static_cast<T>(v); }
#else
CMK_DEV float to_acc(__half v) { return __half2float(v); }
CMK_DEV float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T>
struct FromAcc;
template <>
struct FromAcc<float> {
  CMK_DEV static float of(float v) { return v; }
};
template <>
struct FromAcc<double> {
  CMK_DEV static double of(double v) { return v; }
};
template <>
struct FromAcc<__half> {
  CMK_DEV static __half of(float v) { return __float2half_rn(v); }
};
template <>
struct FromAcc<__nv_bfloat16> {
  CMK_DEV static __nv_bfloat16 of(float v) { return __float2bfloat16_rn(v); }
};
template <typename T, typename A>
CMK_DEV T from_acc(A v) { return FromAcc<T>::of(v); }
#endif
CMK_DEV float rsqrt_acc(float v) { return rsqrtf(v); }
CMK_DEV double rsqrt_acc(double v) { return 1.0 / sqrt(v); }

// g = act(t) as it was stored in dtype `stored` (the BN apply deferred to the next depthwise block, which
// normalizes the stored g). T's own dtype but for the fp64 kernels, which stand in for a caller's
// fp32/bf16/fp16 call (exact training) and round to that dtype, through fp32 as csrc/cpu's round_as_stored does.
template <typename T, typename A>
CMK_DEV A round_as_stored(A g, ScalarKind stored) {
  if constexpr (!std::is_same<T, double>::value) {
    (void)stored;
    return to_acc(from_acc<T>(g));
  } else {
    switch (stored) {
      case ScalarKind::kFloat: return static_cast<float>(g);
      case ScalarKind::kHalf: return to_acc(from_acc<__half>(static_cast<float>(g)));
      case ScalarKind::kBFloat16: return to_acc(from_acc<__nv_bfloat16>(static_cast<float>(g)));
      default: return g;
    }
  }
}

// VEC consecutive elements moved as one 16-byte (or smaller) access.
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};
template <typename T>
constexpr int pack16() { return 16 / static_cast<int>(sizeof(T)); }

// --- compile-time dispatch of (dtype, activation) -------------------------------------------------------
template <typename T>
struct TypeTag {
  using type = T;
};
template <typename T, typename F>
void dispatch_act_for(int act, F&& f) {
  switch (act) {
    case kGelu: f(TypeTag<T>{}, std::integral_constant<int, kGelu>{}); break;
    case kGeluTanh: f(TypeTag<T>{}, std::integral_constant<int, kGeluTanh>{}); break;
    case kRelu: f(TypeTag<T>{}, std::integral_constant<int, kRelu>{}); break;
    default: throw std::invalid_argument("convmixer_kernels: unknown activation code");
  }
}
// A = float dispatches fp32/fp16/bf16, A = double fp64: each launcher is instantiated per accumulation
// type, and only with its own dtypes (no fp64 tiled kernel, no fp32 one fed fp64 statistics).
template <typename A, typename F>
void dispatch_dtype_act(ScalarKind k, int act, F&& f) {
  if (std::is_same<A, double>::value != (k == ScalarKind::kDouble))
    throw std::invalid_argument("convmixer_kernels: the accumulation type does not match the input dtype");
  if constexpr (std::is_same<A, double>::value) {
    dispatch_act_for<double>(act, f);
  } else {
    switch (k) {
      case ScalarKind::kFloat: dispatch_act_for<float>(act, f); break;
      case ScalarKind::kHalf: dispatch_act_for<__half>(act, f); break;
      case ScalarKind::kBFloat16: dispatch_act_for<__nv_bfloat16>(act, f); break;
      default: break;
    }
  }
}

CMK_HD int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// --- layout -----------------------------------------------------------------------------------------
// A dense 4-D activation (N, C, H, W) in NCHW or channels_last: offset = n*sN + c*sC + (h*W + w)*sP.
struct Layout {
  int64_t N, C, H, W, HW, sN, sC, sP;
};
inline Layout make_layout(const Problem& p) {
  const int64_t HW = p.H * p.W;
  return p.channels_last ? Layout{p.N, p.C, p.H, p.W, HW, HW * p.C, 1, p.C}
                         : Layout{p.N, p.C, p.H, p.W, HW, p.C * HW, HW, 1};
}
// The split plan of a per-channel reduction: grid (channel groups, splits), `chunk` pixels per split.
struct SplitPlan {
  int cpb;
  int64_t groups, splits, chunk;
};
inline SplitPlan plan_splits(const Problem& p, const LaunchShape& s) {
  SplitPlan q;
  q.cpb = p.channels_last ? s.channels_per_block : 1;
  q.groups = ceil_div(p.C, q.cpb);
  const int64_t M = p.N * p.H * p.W, lanes = s.threads / q.cpb;
  q.splits = std::max<int64_t>(1, std::min<int64_t>(s.max_splits, ceil_div(M, lanes)));
  q.chunk = ceil_div(M, q.splits);
  q.splits = ceil_div(M, q.chunk);
  return q;
}
CMK_DEV int64_t elem_offset(const Layout& L, int64_t n, int64_t c, int64_t pix) {
  return n * L.sN + c * L.sC + pix * L.sP;
}

// Per-channel split reductions: a block owns `cpb` channels (a power of two <= 32; thread t works on
// channel lane t % cpb) and a contiguous chunk of the N*H*W pixels of those channels. blockDim.x is a
// multiple of 32, so lanes with equal t % cpb inside a warp combine by xor shuffles with offsets >= cpb.

// Sums NV values per channel over the block; the result is valid in threads t < cpb.
template <int NV, typename A>
CMK_DEV void block_channel_sums(A (&v)[NV], int cpb) {
  __shared__ A partial[NV][1024];
  for (int off = kWarp / 2; off >= cpb; off >>= 1)
    for (int i = 0; i < NV; ++i) v[i] += __shfl_xor_sync(kFullMask, v[i], off);
  const int tid = threadIdx.x, lane = tid % kWarp, warp = tid / kWarp, warps = blockDim.x / kWarp;
  if (lane < cpb)
    for (int i = 0; i < NV; ++i) partial[i][warp * cpb + lane] = v[i];
  __syncthreads();
  if (tid < cpb)
    for (int i = 0; i < NV; ++i) {
      A s = 0;
      for (int w = 0; w < warps; ++w) s += partial[i][w * cpb + tid];
      v[i] = s;
    }
  __syncthreads();
}

// Chan/Welford merge of per-thread statistics per channel over the block; valid in threads t < cpb.
template <typename A>
CMK_DEV void block_channel_welford(Welford<A>& a, int cpb) {
  __shared__ A partial[3][1024];
  for (int off = kWarp / 2; off >= cpb; off >>= 1) {
    const A n = __shfl_xor_sync(kFullMask, a.count, off);
    const A m = __shfl_xor_sync(kFullMask, a.mean, off);
    const A q = __shfl_xor_sync(kFullMask, a.m2, off);
    a.merge(n, m, q);
  }
  const int tid = threadIdx.x, lane = tid % kWarp, warp = tid / kWarp, warps = blockDim.x / kWarp;
  if (lane < cpb) {
    partial[0][warp * cpb + lane] = a.count;
    partial[1][warp * cpb + lane] = a.mean;
    partial[2][warp * cpb + lane] = a.m2;
  }
  __syncthreads();
  if (tid < cpb) {
    Welford<A> r;
    for (int w = 0; w < warps; ++w)
      r.merge(partial[0][w * cpb + tid], partial[1][w * cpb + tid], partial[2][w * cpb + tid]);
    a = r;
  }
  __syncthreads();
}

namespace {  // kernels: internal linkage in each translation unit that includes this header

// Merges the per-split (count, mean, M2) partials ws[S][C][3]: one warp per channel, lanes stride
// over the splits, then an xor butterfly. Writes mean, biased var and rstd = 1/sqrt(var + eps). With
// `shift` (C values, or null), the partial means are of g - shift[c] and the batch mean is shift[c] plus
// their merge: one rounding at the end, however large the common offset of g.
template <typename A>
__global__ void welford_finalize_kernel(const A* ws, int64_t S, int64_t C, A eps, A* mean, A* var, A* rstd,
                                        const A* shift) {
  const int64_t c = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp;
  const int lane = threadIdx.x % kWarp;
  Welford<A> a;
  if (c < C)
    for (int64_t s = lane; s < S; s += kWarp) {
      const A* p = ws + (s * C + c) * 3;
      a.merge(p[0], p[1], p[2]);
    }
  for (int off = kWarp / 2; off >= 1; off >>= 1) {
    const A n = __shfl_xor_sync(kFullMask, a.count, off);
    const A m = __shfl_xor_sync(kFullMask, a.mean, off);
    const A q = __shfl_xor_sync(kFullMask, a.m2, off);
    a.merge(n, m, q);
  }
  if (lane == 0 && c < C) {
    const A v = a.m2 / a.count;
    mean[c] = shift != nullptr ? shift[c] + a.mean : a.mean;
    var[c] = v;
    rstd[c] = rsqrt_acc(v + eps);
  }
}

// out[j] = sum_s ws[s][j] for j < width: one warp per column, shuffle-down reduction.
template <typename A>
__global__ void sum_splits_kernel(const A* ws, int64_t S, int64_t width, A* out) {
  const int64_t j = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp;
  const int lane = threadIdx.x % kWarp;
  A s = 0;
  if (j < width)
    for (int64_t i = lane; i < S; i += kWarp) s += ws[i * width + j];
  for (int off = kWarp / 2; off >= 1; off >>= 1) s += __shfl_down_sync(kFullMask, s, off);
  if (lane == 0 && j < width) out[j] = s;
}

// Backward pass 1 leaves (sum dy, sum dy*ghat, sum ghat) per channel, ghat = (g - mean)*rstd with the saved
// mean, which is rounded: off the exact mean of g by up to ulp(mean)/2, so every ghat shares an offset
// dhat = sum ghat / M that is large against 1 when |mean| >> std or M is tiny (it gave dt a common component
// that dw and db multiply by the full mean of u and act'(t); csrc/cpu/dw_block.cpp backward_impl). In place:
// (sum dy, sum dy*(ghat - dhat), dhat); pass 2 centres ghat exactly with it.
template <typename A>
__global__ void recentre_sums_kernel(A* sums, int64_t C, A inv_m) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  A* s = sums + c * 3;
  const A dhat = s[2] * inv_m;
  s[1] -= dhat * s[0];
  s[2] = dhat;
}

}  // namespace

// Finalize kernels: one warp per output column (256 threads on the GPU, 64 under emulation, where
// every thread is an OS thread).
#if defined(CMK_CUDA_EMULATION)
constexpr int kFinalizeThreads = 64;
#else
constexpr int kFinalizeThreads = 256;
#endif
template <typename A>
void launch_welford_finalize(const A* ws, int64_t S, int64_t C, A eps, A* mean, A* var, A* rstd, void* stream,
                             const A* shift = nullptr) {
  const unsigned blocks = static_cast<unsigned>((C * kWarp + kFinalizeThreads - 1) / kFinalizeThreads);
  auto kern = &welford_finalize_kernel<A>;
  CMK_LAUNCH(kern, dim3(blocks), dim3(kFinalizeThreads), 0, stream, ws, S, C, eps, mean, var, rstd, shift);
  CMK_CHECK_LAUNCH("welford_finalize_kernel");
}
template <typename A>
void launch_sum_splits(const A* ws, int64_t S, int64_t width, A* out, void* stream) {
  const unsigned blocks = static_cast<unsigned>((width * kWarp + kFinalizeThreads - 1) / kFinalizeThreads);
  auto kern = &sum_splits_kernel<A>;
  CMK_LAUNCH(kern, dim3(blocks), dim3(kFinalizeThreads), 0, stream, ws, S, width, out);
  CMK_CHECK_LAUNCH("sum_splits_kernel");
}
template <typename A>
void launch_recentre_sums(A* sums, int64_t C, A inv_m, void* stream) {
  const unsigned blocks = static_cast<unsigned>((C + kFinalizeThreads - 1) / kFinalizeThreads);
  auto kern = &recentre_sums_kernel<A>;
  CMK_LAUNCH(kern, dim3(blocks), dim3(kFinalizeThreads), 0, stream, sums, C, inv_m);
  CMK_CHECK_LAUNCH("recentre_sums_kernel");
}

}  // namespace CMK_KNS
}  // namespace cmk
