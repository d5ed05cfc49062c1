// The raw-pointer interface between the launchers (csrc/cuda/*_launch.cpp, which see at::Tensor)
// and the kernels (csrc/cuda/*.cu, which see no torch header). Compiled twice: for the GPU
// (namespace cmk::cuda) and, with CMK_CUDA_EMULATION, for the host emulator (cmk::cuda_emu), so
// the two builds never share a symbol.
#pragma once

#include <cstdint>

#if defined(CMK_CUDA_EMULATION)
#define CMK_KNS cuda_emu
#else
#define CMK_KNS cuda
#endif

namespace cmk {
namespace CMK_KNS {

enum class ScalarKind : int { kFloat = 0, kHalf = 1, kBFloat16 = 2, kDouble = 3 };

// A dense (N, C, H, W) activation in NCHW or channels_last.
struct Problem {
  int64_t N, C, H, W;
  bool channels_last;
  ScalarKind dtype;
  int act;  // cmk::Act
};

// Block geometry, chosen by the launcher: the GPU uses full-size blocks, the emulator small ones
// (every emulated thread is an OS thread). threads is a multiple of 32; channels_per_block a power
// of two <= 32 that divides 32.
struct LaunchShape {
  int threads;             // threads per block of every per-channel and elementwise kernel
  int channels_per_block;  // channel lanes of a per-channel reduction block
  int max_splits;          // pixel chunks per channel group (grid.y of the reductions)
  int elementwise_blocks;  // grid of the grid-stride elementwise kernels
  int tile_h, tile_w;      // spatial tile of the depthwise backward (shared memory with halos)
  int tile_channels;       // channels per depthwise backward tile
  int conv_tile_h, conv_tile_w;  // largest spatial tile of the tiled depthwise conv (k <= 9); w a multiple of 8
  int bwd_tile_h, bwd_tile_w;    // the same for the tiled depthwise backward pass 2
};

}  // namespace CMK_KNS
}  // namespace cmk

namespace cmk {
namespace CMK_KNS {

// Every launcher below is a static member of a struct templated on A, the accumulation type: float for
// fp32/fp16/bf16 inputs, double for fp64 ones (the generic kernels only). A is also the type of every
// per-channel tensor (statistics, BN parameters, input affine, gradient sums) and of the workspace. The
// at::Tensor launchers run fp32/bf16/fp16 training with at most cpu::kExactTrainingMaxCount values per
// channel through A = double as well, on fp64 copies, rounding once at the end (as the CPU backend does).

// --- depthwise block (dw_block.cu) ------------------------------------------------------------------
// Columns of the backward's per-channel gradients grads[C][.]: the k*k weight taps, db, din_scale, din_shift.
constexpr int64_t dw_grad_columns(int64_t k) { return k * k + 3; }

template <typename A>
struct DwBlockLaunch {
  // Elements (of A) of device workspace that forward and backward need.
  static int64_t workspace_elems(const Problem& p, int64_t k, const LaunchShape& s);

  // y = u + gamma*(act(dwconv_k(u) + b) - mean)*rstd + beta with u = in_scale[c]*(x - in_center[c]) +
  // in_shift[c] (C values each), or u = x when the three are null. batch_stats: mean/rstd/var are outputs
  // (batch statistics, biased var); otherwise mean/rstd are inputs and var is unused. !apply: statistics
  // only (a synchronized BN's pass 1), y untouched.
  static void forward(const Problem& p, int64_t k, const LaunchShape& s, const void* x, const A* in_center,
                      const A* in_scale, const A* in_shift, const void* w, const void* b, const A* gamma,
                      const A* beta, A* mean, A* rstd, A* var, bool batch_stats, bool apply, A eps, void* y, A* ws,
                      void* stream);

  // With du = dL/du = dy + conv_transpose(dt): dx = in_scale*du (du without an input affine; input dtype);
  // sums[C][3] = (sum dy, sum dy*ghat, dhat) = (dbeta, dgamma, the recentring of ghat on the exact mean of g;
  // in eval the third column is sum ghat, unused); grads[C][dw_grad_columns(k)] = (dw taps, db,
  // sum du*(x - in_center), sum du), the last two 0 without an input affine. Synchronized BN: sums_given, sums
  // holds the global (mean dy, mean dy*(ghat - dhat), dhat) and pass 1 is skipped; reduce_only stops after
  // pass 1 (sums then (sum dy, sum dy*ghat, sum ghat), not recentred: the caller merges them across ranks first).
  static void backward(const Problem& p, int64_t k, const LaunchShape& s, const void* dy, const void* x,
                       const A* in_center, const A* in_scale, const A* in_shift, const void* w, const void* b,
                       const A* gamma, const A* mean, const A* rstd, bool batch_stats, bool sums_given,
                       bool reduce_only, void* dx, A* sums, A* grads, A* ws, void* stream);
};

// --- conv -> act -> BN epilogue of a GEMM (conv_act_bn.cu) --------------------------------------------
// T is the GEMM output without bias, in A, laid out like the result (Problem p with H x W = Ho x Wo).
// stored: the dtype the caller's y is returned in (p.dtype but on the exact path); a deferred BN's
// statistics, and its backward's ghat, are of g rounded to it.
template <typename A>
struct ConvActBnLaunch {
  static int64_t workspace_elems(const Problem& p, const LaunchShape& s);

  // Training (batch_stats): T += b in place, batch mean/var/rstd into mean/var/rstd, then the apply pass.
  // Eval: the apply pass with t = T + b. Apply: y = gamma*(act(t) - mean)*rstd + beta, or y = act(t)
  // when !apply_bn (the next depthwise block applies the BN); t_out (input dtype, may be null) = t.
  static void forward(const Problem& p, const LaunchShape& s, ScalarKind stored, A* T, const void* b,
                      const A* gamma, const A* beta, A* mean, A* rstd, A* var, bool batch_stats, A eps,
                      bool apply_bn, void* y, void* t_out, A* ws, void* stream);

  // t is either t_saved (input dtype) or T_acc + b rounded to the input dtype. Writes dT (input dtype) and
  // sum_dt[C]; with apply_bn also sums[C][3] = (sum dy, sum dy*ghat, dhat) as in DwBlockLaunch::backward
  // (dgamma = sum dy*(ghat - dhat) in training). Without apply_bn, dy is dL/dg for g = act(t) and
  // dmean/drstd (C values, or null: zero) the gradients of the batch mean and rstd; sums is not touched.
  static void backward(const Problem& p, const LaunchShape& s, ScalarKind stored, const void* dy,
                       const void* t_saved, const A* T_acc, const void* b, const A* gamma, const A* mean,
                       const A* rstd, const A* dmean, const A* drstd, bool batch_stats, bool apply_bn, void* dT,
                       A* sums, A* sum_dt, A* ws, void* stream);
};

}  // namespace CMK_KNS
}  // namespace cmk
