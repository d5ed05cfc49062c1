// The at::Tensor launchers of the CUDA backend (cmk::cuda, CUDA tensors; built with CMK_WITH_CUDA)
// and of its host emulation (cmk::cuda_emu, CPU tensors; always built). Same arguments and outputs
// as the CPU launchers in csrc/cpu/*.h.
#pragma once

#include <ATen/ATen.h>

#include <vector>

#define CMK_DECLARE_CUDA_LAUNCHERS                                                                                   \
  std::vector<at::Tensor> dw_block_forward(const at::Tensor& x, const at::Tensor& in_center,                         \
                                           const at::Tensor& in_scale, const at::Tensor& in_shift,                   \
                                           const at::Tensor& weight, const at::Tensor& bias,                         \
                                           const at::Tensor& gamma, const at::Tensor& beta, const at::Tensor& mean,  \
                                           const at::Tensor& rstd, bool batch_stats, double eps, int64_t act);       \
  std::vector<at::Tensor> dw_block_backward(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& in_center,  \
                                            const at::Tensor& in_scale, const at::Tensor& in_shift,                  \
                                            const at::Tensor& weight, const at::Tensor& bias,                        \
                                            const at::Tensor& gamma, const at::Tensor& mean, const at::Tensor& rstd, \
                                            bool batch_stats, const at::Tensor& dy_means, int64_t act);              \
  std::vector<at::Tensor> dw_block_batch_stats(const at::Tensor& x, const at::Tensor& in_center,                     \
                                               const at::Tensor& in_scale, const at::Tensor& in_shift,               \
                                               const at::Tensor& weight, const at::Tensor& bias, int64_t act);       \
  at::Tensor dw_block_backward_reduce(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& in_center,        \
                                      const at::Tensor& in_scale, const at::Tensor& in_shift,                        \
                                      const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& mean,      \
                                      const at::Tensor& rstd, int64_t act);                                          \
  std::vector<at::Tensor> conv_act_bn_forward(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,  \
                                              const at::Tensor& gamma, const at::Tensor& beta,                        \
                                              const at::Tensor& mean, const at::Tensor& rstd, bool batch_stats,       \
                                              double eps, int64_t act, int64_t patch, bool save_t, bool apply_bn);    \
  std::vector<at::Tensor> conv_act_bn_backward(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight,  \
                                               const at::Tensor& bias, const at::Tensor& gamma,                       \
                                               const at::Tensor& mean, const at::Tensor& rstd, const at::Tensor& t,   \
                                               const at::Tensor& dmean, const at::Tensor& drstd, bool batch_stats,    \
                                               int64_t act, int64_t patch, bool apply_bn, bool need_dx);

namespace cmk {
namespace cuda {
CMK_DECLARE_CUDA_LAUNCHERS
}  // namespace cuda
namespace cuda_emu {
CMK_DECLARE_CUDA_LAUNCHERS
}  // namespace cuda_emu
}  // namespace cmk

#undef CMK_DECLARE_CUDA_LAUNCHERS
