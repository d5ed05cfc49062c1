// at::Tensor launchers of the fused depthwise block for the CUDA backend (and, included by
// csrc/cuda_emu/dw_block_emu.cpp with CMK_CUDA_EMULATION, for its host emulation). They check the
// inputs, allocate outputs and workspace, and call the raw launcher in dw_block.cu on the current
// stream. Torch ops used here: allocation, and the final split of the per-channel fp32 gradient
// buffers into dweight/dbias/dgamma/dbeta/din_scale/din_shift (C-sized tensors).
#include "launch_common.h"
#include "launchers.h"

namespace cmk {
namespace CMK_KNS {
namespace {

void check_dw(const char* op, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
              const at::Tensor& gamma) {
  check_activation(op, x);
  const int64_t C = x.size(1);
  check_on_device(op, "weight", weight);
  check_on_device(op, "bias", bias);
  TORCH_CHECK(weight.dim() == 4 && weight.size(0) == C && weight.size(1) == 1 && weight.size(2) == weight.size(3) &&
                  weight.size(2) >= 1,
              op, ": weight must have shape (C, 1, k, k) with C = ", C, " input channels, got ", weight.sizes());
  TORCH_CHECK(weight.scalar_type() == x.scalar_type() && bias.scalar_type() == x.scalar_type(), op,
              ": weight/bias dtype must match the input dtype ", x.scalar_type());
  TORCH_CHECK(bias.dim() == 1 && bias.size(0) == C && bias.is_contiguous(), op, ": bias must have shape (", C, ")");
  check_per_channel_f32(op, "gamma", gamma, C);
}

// The input affine u = in_scale*x + in_shift (the previous pointwise block's BN apply): both empty
// (u = x; returns false) or both fp32 (C,) on the device (returns true).
bool check_input_affine(const char* op, const at::Tensor& in_scale, const at::Tensor& in_shift, int64_t C) {
  TORCH_CHECK(in_scale.numel() == in_shift.numel(), op, ": in_scale and in_shift must both be empty or both have ",
              C, " elements, got shapes ", in_scale.sizes(), " and ", in_shift.sizes());
  if (in_scale.numel() == 0) return false;
  check_per_channel_f32(op, "in_scale", in_scale, C);
  check_per_channel_f32(op, "in_shift", in_shift, C);
  return true;
}

}  // namespace

std::vector<at::Tensor> dw_block_forward(const at::Tensor& x, const at::Tensor& in_scale, const at::Tensor& in_shift,
                                         const at::Tensor& weight_in, const at::Tensor& bias, const at::Tensor& gamma,
                                         const at::Tensor& beta, const at::Tensor& mean, const at::Tensor& rstd,
                                         bool batch_stats, double eps, int64_t act) {
  const char* op = "dw_block_forward";
  check_dw(op, x, weight_in, bias, gamma);
  const int64_t C = x.size(1), k = weight_in.size(2);
  const bool has_affine = check_input_affine(op, in_scale, in_shift, C);
  check_per_channel_f32(op, "beta", beta, C);
  if (!batch_stats) {
    check_per_channel_f32(op, "mean", mean, C);
    check_per_channel_f32(op, "rstd", rstd, C);
  }
  DeviceGuard guard(x);
  const at::Tensor weight = weight_in.contiguous();
  const Problem p = make_problem(x, C, x.size(2), x.size(3), act);
  const LaunchShape s = launch_shape(p);
  const auto f32 = gamma.options();
  at::Tensor y = cpu::poisoned(at::empty_like(x));
  at::Tensor mean_out = batch_stats ? cpu::poisoned(at::empty({C}, f32)) : mean;
  at::Tensor rstd_out = batch_stats ? cpu::poisoned(at::empty({C}, f32)) : rstd;
  at::Tensor var_out = batch_stats ? cpu::poisoned(at::empty({C}, f32)) : at::empty({0}, f32);
  at::Tensor ws = workspace(x, batch_stats ? dw_block_workspace_floats(p, k, s) : 0);
  dw_block_forward_launch(p, k, s, x.const_data_ptr(), has_affine ? in_scale.const_data_ptr<float>() : nullptr,
                          has_affine ? in_shift.const_data_ptr<float>() : nullptr, weight.const_data_ptr(),
                          bias.const_data_ptr(), gamma.const_data_ptr<float>(), beta.const_data_ptr<float>(),
                          mean_out.data_ptr<float>(),
                          rstd_out.data_ptr<float>(), batch_stats ? var_out.data_ptr<float>() : nullptr, batch_stats,
                          static_cast<float>(eps), y.data_ptr(), ws.data_ptr<float>(), current_stream(x));
  if (!batch_stats) return {y, at::empty({0}, f32), at::empty({0}, f32), var_out};
  return {y, mean_out, rstd_out, var_out};
}

std::vector<at::Tensor> dw_block_backward(const at::Tensor& dy_in, const at::Tensor& x, const at::Tensor& in_scale,
                                          const at::Tensor& in_shift, const at::Tensor& weight_in,
                                          const at::Tensor& bias, const at::Tensor& gamma, const at::Tensor& mean,
                                          const at::Tensor& rstd, bool batch_stats, int64_t act) {
  const char* op = "dw_block_backward";
  check_dw(op, x, weight_in, bias, gamma);
  const int64_t C = x.size(1), k = weight_in.size(2);
  const bool has_affine = check_input_affine(op, in_scale, in_shift, C);
  check_per_channel_f32(op, "mean", mean, C);
  check_per_channel_f32(op, "rstd", rstd, C);
  check_on_device(op, "grad_output", dy_in);
  TORCH_CHECK(dy_in.sizes() == x.sizes(), op, ": grad_output has shape ", dy_in.sizes(), " but x has shape ",
              x.sizes());
  TORCH_CHECK(dy_in.scalar_type() == x.scalar_type(), op, ": grad_output dtype ", dy_in.scalar_type(),
              " differs from x dtype ", x.scalar_type());
  DeviceGuard guard(x);
  const Problem p = make_problem(x, C, x.size(2), x.size(3), act);
  const LaunchShape s = launch_shape(p);
  const at::Tensor dy = dy_in.contiguous(p.channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
  const at::Tensor weight = weight_in.contiguous();
  const auto f32 = gamma.options();
  at::Tensor dx = cpu::poisoned(at::empty_like(x));
  at::Tensor sums = cpu::poisoned(at::empty({C, 2}, f32));           // (sum dy, sum dy*ghat)
  // (dw taps, db, din_scale = sum du*x, din_shift = sum du)
  at::Tensor grads = cpu::poisoned(at::empty({C, dw_grad_columns(k)}, f32));
  at::Tensor ws = workspace(x, dw_block_workspace_floats(p, k, s));
  dw_block_backward_launch(p, k, s, dy.const_data_ptr(), x.const_data_ptr(),
                           has_affine ? in_scale.const_data_ptr<float>() : nullptr,
                           has_affine ? in_shift.const_data_ptr<float>() : nullptr, weight.const_data_ptr(),
                           bias.const_data_ptr(), gamma.const_data_ptr<float>(), mean.const_data_ptr<float>(),
                           rstd.const_data_ptr<float>(), batch_stats, dx.data_ptr(), sums.data_ptr<float>(),
                           grads.data_ptr<float>(), ws.data_ptr<float>(), current_stream(x));
  at::Tensor dweight = grads.narrow(1, 0, k * k).to(weight.scalar_type()).reshape(weight.sizes()).contiguous();
  at::Tensor dbias = grads.select(1, k * k).to(bias.scalar_type()).contiguous();
  at::Tensor din_scale = has_affine ? grads.select(1, k * k + 1).contiguous() : at::empty({0}, f32);
  at::Tensor din_shift = has_affine ? grads.select(1, k * k + 2).contiguous() : at::empty({0}, f32);
  return {dx, dweight, dbias, sums.select(1, 1).contiguous(), sums.select(1, 0).contiguous(), din_scale, din_shift};
}

}  // namespace CMK_KNS
}  // namespace cmk
