#pragma once

#include <ATen/ATen.h>

#include <vector>

#include "cpu_common.h"

namespace cmk {
namespace cpu {

// Returns {y, t, mean, rstd, var}: t = conv(x) + b when save_t (else empty); batch statistics
// (biased var) when batch_stats (else empty).
std::vector<at::Tensor> conv_act_bn_forward(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                                            const at::Tensor& gamma, const at::Tensor& beta, const at::Tensor& mean,
                                            const at::Tensor& rstd, bool batch_stats, double eps, int64_t act,
                                            int64_t patch, bool save_t);

// Returns {dx, dweight, dbias, dgamma, dbeta}. t may be empty: it is then recomputed from x.
std::vector<at::Tensor> conv_act_bn_backward(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight,
                                             const at::Tensor& bias, const at::Tensor& gamma, const at::Tensor& mean,
                                             const at::Tensor& rstd, const at::Tensor& t, bool batch_stats,
                                             int64_t act, int64_t patch);

}  // namespace cpu
}  // namespace cmk
