#pragma once

#include <ATen/ATen.h>

#include <vector>

#include "cpu_common.h"

namespace cmk {
namespace cpu {

// Returns {y, t, mean, rstd, var}: t = conv(x) + b when save_t (else empty); batch statistics
// (biased var) when batch_stats (else empty). apply_bn = false: y = act(t), the BN left to the next block.
std::vector<at::Tensor> conv_act_bn_forward(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                                            const at::Tensor& gamma, const at::Tensor& beta, const at::Tensor& mean,
                                            const at::Tensor& rstd, bool batch_stats, double eps, int64_t act,
                                            int64_t patch, bool save_t, bool apply_bn);

// Returns {dx, dweight, dbias, dgamma, dbeta}. t may be empty: it is then recomputed from x.
// apply_bn = false: dy is dL/d act(t), dmean/drstd (empty: zero) the gradients of the batch mean
// and rstd outputs; dgamma = dbeta = 0. need_dx = false: dx is empty (dZ = dT W is not formed).
std::vector<at::Tensor> conv_act_bn_backward(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight,
                                             const at::Tensor& bias, const at::Tensor& gamma, const at::Tensor& mean,
                                             const at::Tensor& rstd, const at::Tensor& t, const at::Tensor& dmean,
                                             const at::Tensor& drstd, bool batch_stats, int64_t act, int64_t patch,
                                             bool apply_bn, bool need_dx);

}  // namespace cpu
}  // namespace cmk
