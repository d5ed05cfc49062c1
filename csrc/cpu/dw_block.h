#pragma once

#include <ATen/ATen.h>

#include <vector>

#include "cpu_common.h"

namespace cmk {
namespace cpu {

inline void check_dw_inputs(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
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
  if (!batch_stats) {
    check_per_channel(op, "mean", mean, C, acc);
    check_per_channel(op, "rstd", rstd, C, acc);
  }
}

// Returns {y, mean, rstd, var}: the batch statistics (biased var), empty when batch_stats is false.
std::vector<at::Tensor> dw_block_forward(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                                         const at::Tensor& gamma, const at::Tensor& beta, const at::Tensor& mean,
                                         const at::Tensor& rstd, bool batch_stats, double eps, int64_t act);

// Returns {dx, dweight, dbias, dgamma, dbeta}.
std::vector<at::Tensor> dw_block_backward(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight,
                                          const at::Tensor& bias, const at::Tensor& gamma, const at::Tensor& mean,
                                          const at::Tensor& rstd, bool batch_stats, int64_t act);

}  // namespace cpu
}  // namespace cmk
