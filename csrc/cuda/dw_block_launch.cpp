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

// The input affine u = in_scale*(x - in_center) + in_shift (the previous pointwise block's BN apply):
// all three empty (u = x; returns false) or all three fp32 (C,) on the device (returns true).
bool check_input_affine(const char* op, const at::Tensor& in_center, const at::Tensor& in_scale,
                        const at::Tensor& in_shift, int64_t C) {
  TORCH_CHECK(in_scale.numel() == in_shift.numel() && in_scale.numel() == in_center.numel(), op,
              ": in_center, in_scale and in_shift must all be empty or all have ", C, " elements, got shapes ",
              in_center.sizes(), ", ", in_scale.sizes(), " and ", in_shift.sizes());
  if (in_scale.numel() == 0) return false;
  check_per_channel_f32(op, "in_center", in_center, C);
  check_per_channel_f32(op, "in_scale", in_scale, C);
  check_per_channel_f32(op, "in_shift", in_shift, C);
  return true;
}

}  // namespace

namespace {

// Checks, launch geometry and the dense operands every depthwise entry point shares.
struct DwCall {
  Problem p;
  LaunchShape s;
  int64_t C, k;
  bool has_affine;
  at::Tensor weight;
  const float* in_center() const { return has_affine ? center.const_data_ptr<float>() : nullptr; }
  const float* in_scale() const { return has_affine ? scale.const_data_ptr<float>() : nullptr; }
  const float* in_shift() const { return has_affine ? shift.const_data_ptr<float>() : nullptr; }
  at::Tensor center, scale, shift;
};

DwCall dw_call(const char* op, const at::Tensor& x, const at::Tensor& in_center, const at::Tensor& in_scale,
               const at::Tensor& in_shift,
               const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& gamma, int64_t act) {
  check_dw(op, x, weight, bias, gamma);
  DwCall c;
  c.C = x.size(1);
  c.k = weight.size(2);
  c.has_affine = check_input_affine(op, in_center, in_scale, in_shift, c.C);
  c.center = in_center;
  c.scale = in_scale;
  c.shift = in_shift;
  c.weight = weight.contiguous();
  c.p = make_problem(x, c.C, x.size(2), x.size(3), act);
  c.s = launch_shape(c.p);
  return c;
}

// dy in x's layout, after the checks every backward entry point shares.
at::Tensor dense_grad_output(const char* op, const at::Tensor& dy_in, const at::Tensor& x, const Problem& p) {
  check_on_device(op, "grad_output", dy_in);
  TORCH_CHECK(dy_in.sizes() == x.sizes(), op, ": grad_output has shape ", dy_in.sizes(), " but x has shape ",
              x.sizes());
  TORCH_CHECK(dy_in.scalar_type() == x.scalar_type(), op, ": grad_output dtype ", dy_in.scalar_type(),
              " differs from x dtype ", x.scalar_type());
  return dy_in.contiguous(p.channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
}

}  // namespace

std::vector<at::Tensor> dw_block_forward(const at::Tensor& x, const at::Tensor& in_center, const at::Tensor& in_scale,
                                         const at::Tensor& in_shift, const at::Tensor& weight_in,
                                         const at::Tensor& bias, const at::Tensor& gamma, const at::Tensor& beta,
                                         const at::Tensor& mean, const at::Tensor& rstd, bool batch_stats, double eps,
                                         int64_t act) {
  const char* op = "dw_block_forward";
  const DwCall c = dw_call(op, x, in_center, in_scale, in_shift, weight_in, bias, gamma, act);
  check_per_channel_f32(op, "beta", beta, c.C);
  if (!batch_stats) {
    check_per_channel_f32(op, "mean", mean, c.C);
    check_per_channel_f32(op, "rstd", rstd, c.C);
  }
  DeviceGuard guard(x);
  const auto f32 = gamma.options();
  at::Tensor y = cpu::poisoned(at::empty_like(x));
  at::Tensor mean_out = batch_stats ? cpu::poisoned(at::empty({c.C}, f32)) : mean;
  at::Tensor rstd_out = batch_stats ? cpu::poisoned(at::empty({c.C}, f32)) : rstd;
  at::Tensor var_out = batch_stats ? cpu::poisoned(at::empty({c.C}, f32)) : at::empty({0}, f32);
  at::Tensor ws = workspace(x, batch_stats ? dw_block_workspace_floats(c.p, c.k, c.s) : 0);
  dw_block_forward_launch(c.p, c.k, c.s, x.const_data_ptr(), c.in_center(), c.in_scale(), c.in_shift(),
                          c.weight.const_data_ptr(), bias.const_data_ptr(), gamma.const_data_ptr<float>(),
                          beta.const_data_ptr<float>(), mean_out.data_ptr<float>(), rstd_out.data_ptr<float>(),
                          batch_stats ? var_out.data_ptr<float>() : nullptr, batch_stats, /*apply=*/true,
                          static_cast<float>(eps), y.data_ptr(), ws.data_ptr<float>(), current_stream(x));
  if (!batch_stats) return {y, at::empty({0}, f32), at::empty({0}, f32), var_out};
  return {y, mean_out, rstd_out, var_out};
}

std::vector<at::Tensor> dw_block_batch_stats(const at::Tensor& x, const at::Tensor& in_center,
                                             const at::Tensor& in_scale, const at::Tensor& in_shift,
                                             const at::Tensor& weight_in, const at::Tensor& bias, int64_t act) {
  const at::Tensor unused = at::zeros({x.size(1)}, x.options().dtype(at::kFloat));  // gamma/beta: apply only
  const DwCall c = dw_call("dw_block_batch_stats", x, in_center, in_scale, in_shift, weight_in, bias, unused, act);
  DeviceGuard guard(x);
  at::Tensor mean = cpu::poisoned(at::empty({c.C}, unused.options()));
  at::Tensor rstd = at::empty({c.C}, unused.options());
  at::Tensor var = cpu::poisoned(at::empty({c.C}, unused.options()));
  at::Tensor ws = workspace(x, dw_block_workspace_floats(c.p, c.k, c.s));
  dw_block_forward_launch(c.p, c.k, c.s, x.const_data_ptr(), c.in_center(), c.in_scale(), c.in_shift(),
                          c.weight.const_data_ptr(), bias.const_data_ptr(), unused.const_data_ptr<float>(),
                          unused.const_data_ptr<float>(), mean.data_ptr<float>(), rstd.data_ptr<float>(),
                          var.data_ptr<float>(), true, /*apply=*/false, 1.f /* eps: rstd unused */, nullptr,
                          ws.data_ptr<float>(), current_stream(x));
  return {mean, var};
}

std::vector<at::Tensor> dw_block_backward(const at::Tensor& dy_in, const at::Tensor& x, const at::Tensor& in_center,
                                          const at::Tensor& in_scale, const at::Tensor& in_shift,
                                          const at::Tensor& weight_in, const at::Tensor& bias, const at::Tensor& gamma,
                                          const at::Tensor& mean, const at::Tensor& rstd, bool batch_stats,
                                          const at::Tensor& dy_means, int64_t act) {
  const char* op = "dw_block_backward";
  const DwCall c = dw_call(op, x, in_center, in_scale, in_shift, weight_in, bias, gamma, act);
  check_per_channel_f32(op, "mean", mean, c.C);
  check_per_channel_f32(op, "rstd", rstd, c.C);
  const bool sums_given = dy_means.numel() > 0;
  if (sums_given) {
    TORCH_CHECK(batch_stats, op, ": dy_means is only meaningful with batch statistics");
    check_on_device(op, "dy_means", dy_means);
    TORCH_CHECK(dy_means.dim() == 2 && dy_means.size(0) == 3 && dy_means.size(1) == c.C &&
                    dy_means.scalar_type() == at::kFloat,
                op, ": dy_means must be a float32 (3, ", c.C, ") tensor, got ", dy_means.scalar_type(), " ",
                dy_means.sizes());
  }
  const at::Tensor dy = dense_grad_output(op, dy_in, x, c.p);
  DeviceGuard guard(x);
  const auto f32 = gamma.options();
  at::Tensor dx = cpu::poisoned(at::empty_like(x));
  // (sum dy, sum dy*ghat, dhat) after pass 1 (launch_recentre_sums), or the given global means (the same
  // three, as means)
  at::Tensor sums = cpu::poisoned(at::empty({c.C, 3}, f32));
  if (sums_given) sums.copy_(dy_means.t());
  // (dw taps, db, din_scale = sum du*(x - in_center), din_shift = sum du)
  at::Tensor grads = cpu::poisoned(at::empty({c.C, dw_grad_columns(c.k)}, f32));
  at::Tensor ws = workspace(x, dw_block_workspace_floats(c.p, c.k, c.s));
  dw_block_backward_launch(c.p, c.k, c.s, dy.const_data_ptr(), x.const_data_ptr(), c.in_center(), c.in_scale(),
                           c.in_shift(), c.weight.const_data_ptr(), bias.const_data_ptr(),
                           gamma.const_data_ptr<float>(), mean.const_data_ptr<float>(), rstd.const_data_ptr<float>(),
                           batch_stats, sums_given, /*reduce_only=*/false, dx.data_ptr(), sums.data_ptr<float>(),
                           grads.data_ptr<float>(), ws.data_ptr<float>(), current_stream(x));
  const int64_t k = c.k;
  at::Tensor dweight = grads.narrow(1, 0, k * k).to(c.weight.scalar_type()).reshape(c.weight.sizes()).contiguous();
  at::Tensor dbias = grads.select(1, k * k).to(bias.scalar_type()).contiguous();
  at::Tensor din_scale = c.has_affine ? grads.select(1, k * k + 1).contiguous() : at::empty({0}, f32);
  at::Tensor din_shift = c.has_affine ? grads.select(1, k * k + 2).contiguous() : at::empty({0}, f32);
  at::Tensor dgamma = sums_given ? at::empty({0}, f32) : sums.select(1, 1).contiguous();
  at::Tensor dbeta = sums_given ? at::empty({0}, f32) : sums.select(1, 0).contiguous();
  return {dx, dweight, dbias, dgamma, dbeta, din_scale, din_shift};
}

at::Tensor dw_block_backward_reduce(const at::Tensor& dy_in, const at::Tensor& x, const at::Tensor& in_center,
                                    const at::Tensor& in_scale, const at::Tensor& in_shift, const at::Tensor& weight_in,
                                    const at::Tensor& bias, const at::Tensor& mean, const at::Tensor& rstd,
                                    int64_t act) {
  const char* op = "dw_block_backward_reduce";
  const DwCall c = dw_call(op, x, in_center, in_scale, in_shift, weight_in, bias, mean, act);
  check_per_channel_f32(op, "rstd", rstd, c.C);
  const at::Tensor dy = dense_grad_output(op, dy_in, x, c.p);
  DeviceGuard guard(x);
  at::Tensor sums = cpu::poisoned(at::empty({c.C, 3}, mean.options()));
  at::Tensor ws = workspace(x, dw_block_workspace_floats(c.p, c.k, c.s));
  dw_block_backward_launch(c.p, c.k, c.s, dy.const_data_ptr(), x.const_data_ptr(), c.in_center(), c.in_scale(),
                           c.in_shift(), c.weight.const_data_ptr(), bias.const_data_ptr(), mean.const_data_ptr<float>(),
                           mean.const_data_ptr<float>(), rstd.const_data_ptr<float>(), true, false,
                           /*reduce_only=*/true, nullptr, sums.data_ptr<float>(), nullptr, ws.data_ptr<float>(),
                           current_stream(x));
  return sums.t().contiguous();  // (3, C): sum dy, sum dy*ghat, sum ghat
}

}  // namespace CMK_KNS
}  // namespace cmk
