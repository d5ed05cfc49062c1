#pragma once

#include <ATen/ATen.h>

#include <vector>

#include "cpu_common.h"

namespace cmk {
namespace cpu {

// The input affine u = in_scale*(x - in_center) + in_shift (the previous pointwise block's BN apply):
// all three empty, or all three C values in the accumulation dtype.
inline void check_input_affine(const char* op, const at::Tensor& in_center, const at::Tensor& in_scale,
                               const at::Tensor& in_shift, int64_t C, at::ScalarType acc) {
  TORCH_CHECK(in_scale.numel() == in_shift.numel() && in_scale.numel() == in_center.numel(), op,
              ": in_center, in_scale and in_shift must all be empty or all have ", C, " elements, got ",
              in_center.sizes(), ", ", in_scale.sizes(), " and ", in_shift.sizes());
  if (in_scale.numel() == 0) return;
  check_per_channel(op, "in_center", in_center, C, acc);
  check_per_channel(op, "in_scale", in_scale, C, acc);
  check_per_channel(op, "in_shift", in_shift, C, acc);
}

inline void check_dw_inputs(const at::Tensor& x, const at::Tensor& in_center, const at::Tensor& in_scale,
                            const at::Tensor& in_shift, const at::Tensor& weight, const at::Tensor& bias,
                            const at::Tensor& gamma, const at::Tensor& beta, const at::Tensor& mean,
                            const at::Tensor& rstd, bool batch_stats) {
  const char* op = "dw_block";
  check_activation_tensor(op, x);
  const int64_t C = x.size(1);
  TORCH_CHECK(weight.dim() == 4 && weight.size(0) == C && weight.size(1) == 1 && weight.size(2) == weight.size(3) &&
                  weight.size(2) >= 1,
              op, ": weight must have shape (C, 1, k, k) with C = ", C, " input channels, got ", weight.sizes());
  TORCH_CHECK(weight.scalar_type() == x.scalar_type() && bias.scalar_type() == x.scalar_type(), op,
              ": weight/bias dtype must match the input dtype ", x.scalar_type());
  TORCH_CHECK(weight.device().is_cpu() && bias.device().is_cpu(), op, ": weight and bias must be CPU tensors");
  TORCH_CHECK(bias.dim() == 1 && bias.size(0) == C && bias.is_contiguous(), op, ": bias must have shape (", C, ")");
  const auto acc = acc_type_for(x.scalar_type());
  check_per_channel(op, "gamma", gamma, C, acc);
  check_per_channel(op, "beta", beta, C, acc);
  check_input_affine(op, in_center, in_scale, in_shift, C, acc);
  if (!batch_stats) {
    check_per_channel(op, "mean", mean, C, acc);
    check_per_channel(op, "rstd", rstd, C, acc);
  }
}

// bf16 channels_last eval through AVX512_BF16 pair dots (dw_block.cpp, conv_tiles_pairs_k): built where the
// compile target has the instructions, off unless switched on. Off by default: on the Zen 4 it was written
// for it measured slower than the fp32 FMAs (benchmarks/RESULTS.md), so it is kept for tuning, tested both ways.
bool bf16_pair_dots_built();
inline bool& bf16_pair_dots_flag() {
  static bool on = false;
  return on;
}

// Returns {y, mean, rstd, var}: the batch statistics (biased var), empty when batch_stats is false.
// The block's input is u = in_scale*(x - in_center) + in_shift per channel, or x when all are empty.
std::vector<at::Tensor> dw_block_forward(const at::Tensor& x, const at::Tensor& in_center, const at::Tensor& in_scale,
                                         const at::Tensor& in_shift, const at::Tensor& weight, const at::Tensor& bias,
                                         const at::Tensor& gamma, const at::Tensor& beta, const at::Tensor& mean,
                                         const at::Tensor& rstd, bool batch_stats, double eps, int64_t act);

// Returns {dx, dweight, dbias, dgamma, dbeta, din_scale, din_shift} (the last two empty without an
// input affine). dy_means (2, C), for a synchronized BN: the global means of dy and dy*ghat used in
// dg; the local sums are then not formed and dgamma/dbeta come back empty (dw_block_backward_reduce).
std::vector<at::Tensor> dw_block_backward(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& in_center,
                                          const at::Tensor& in_scale, const at::Tensor& in_shift,
                                          const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& gamma,
                                          const at::Tensor& mean, const at::Tensor& rstd, bool batch_stats,
                                          const at::Tensor& dy_means, int64_t act);

// Synchronized BN, forward pass 1: {mean, var} (biased) of g = act(dwconv(u) + b) over this call's batch.
std::vector<at::Tensor> dw_block_batch_stats(const at::Tensor& x, const at::Tensor& in_center,
                                             const at::Tensor& in_scale, const at::Tensor& in_shift,
                                             const at::Tensor& weight, const at::Tensor& bias, int64_t act);

// Synchronized BN, backward pass 1: (2, C) local sums [sum dy, sum dy*ghat], ghat = (g - mean)*rstd.
at::Tensor dw_block_backward_reduce(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& in_center,
                                    const at::Tensor& in_scale, const at::Tensor& in_shift, const at::Tensor& weight,
                                    const at::Tensor& bias, const at::Tensor& mean, const at::Tensor& rstd,
                                    int64_t act);

}  // namespace cpu
}  // namespace cmk
