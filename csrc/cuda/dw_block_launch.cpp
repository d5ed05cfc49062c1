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
  check_per_channel(op, "gamma", gamma, C, acc_dtype(x));
}

// The input affine u = in_scale*(x - in_center) + in_shift (the previous pointwise block's BN apply):
// all three empty (u = x; returns false) or all three (C,) in the accumulation dtype on the device.
bool check_input_affine(const char* op, const at::Tensor& x, const at::Tensor& in_center, const at::Tensor& in_scale,
                        const at::Tensor& in_shift, int64_t C) {
  TORCH_CHECK(in_scale.numel() == in_shift.numel() && in_scale.numel() == in_center.numel(), op,
              ": in_center, in_scale and in_shift must all be empty or all have ", C, " elements, got shapes ",
              in_center.sizes(), ", ", in_scale.sizes(), " and ", in_shift.sizes());
  if (in_scale.numel() == 0) return false;
  check_per_channel(op, "in_center", in_center, C, acc_dtype(x));
  check_per_channel(op, "in_scale", in_scale, C, acc_dtype(x));
  check_per_channel(op, "in_shift", in_shift, C, acc_dtype(x));
  return true;
}

// Checks, launch geometry and the dense operands every depthwise entry point shares.
struct DwCall {
  Problem p;
  LaunchShape s;
  int64_t C, k;
  at::ScalarType acc;
  at::Tensor weight, center, scale, shift;  // the input affine's three: empty without one
};

DwCall dw_call(const char* op, const at::Tensor& x, const at::Tensor& in_center, const at::Tensor& in_scale,
               const at::Tensor& in_shift, const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& gamma,
               int64_t act) {
  check_dw(op, x, weight, bias, gamma);
  DwCall c;
  c.C = x.size(1);
  c.k = weight.size(2);
  c.acc = acc_dtype(x);
  check_input_affine(op, x, in_center, in_scale, in_shift, c.C);
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

int64_t per_image_count(const at::Tensor& x) { return x.size(0) * x.size(2) * x.size(3); }

// DwBlockLaunch<A>::forward with A from the input's accumulation dtype and a fresh workspace. y undefined:
// statistics only (!apply); var undefined: eval.
void launch_forward(const DwCall& c, const at::Tensor& x, const at::Tensor& bias, const at::Tensor& gamma,
                    const at::Tensor& beta, const at::Tensor& mean, const at::Tensor& rstd, const at::Tensor& var,
                    bool batch_stats, double eps, const at::Tensor& y) {
  with_acc_type(c.acc, [&](auto a) {
    using A = decltype(a);
    using K = DwBlockLaunch<A>;
    at::Tensor ws = workspace(x, batch_stats ? K::workspace_elems(c.p, c.k, c.s) : 0, c.acc);
    K::forward(c.p, c.k, c.s, x.const_data_ptr(), data_or_null<A>(c.center), data_or_null<A>(c.scale),
               data_or_null<A>(c.shift), c.weight.const_data_ptr(), bias.const_data_ptr(), gamma.const_data_ptr<A>(),
               beta.const_data_ptr<A>(), mean.data_ptr<A>(), rstd.data_ptr<A>(), mutable_data_or_null<A>(var),
               batch_stats, /*apply=*/y.defined(), static_cast<A>(eps), y.defined() ? y.data_ptr() : nullptr,
               ws.data_ptr<A>(), current_stream(x));
  });
}

// DwBlockLaunch<A>::backward likewise; dx and grads undefined: pass 1 only (reduce_only).
void launch_backward(const DwCall& c, const at::Tensor& dy, const at::Tensor& x, const at::Tensor& bias,
                     const at::Tensor& gamma, const at::Tensor& mean, const at::Tensor& rstd, bool batch_stats,
                     bool sums_given, const at::Tensor& dx, const at::Tensor& sums, const at::Tensor& grads) {
  with_acc_type(c.acc, [&](auto a) {
    using A = decltype(a);
    using K = DwBlockLaunch<A>;
    at::Tensor ws = workspace(x, K::workspace_elems(c.p, c.k, c.s), c.acc);
    K::backward(c.p, c.k, c.s, dy.const_data_ptr(), x.const_data_ptr(), data_or_null<A>(c.center),
                data_or_null<A>(c.scale), data_or_null<A>(c.shift), c.weight.const_data_ptr(), bias.const_data_ptr(),
                gamma.const_data_ptr<A>(), mean.const_data_ptr<A>(), rstd.const_data_ptr<A>(), batch_stats, sums_given,
                /*reduce_only=*/!dx.defined(), dx.defined() ? dx.data_ptr() : nullptr, sums.data_ptr<A>(),
                mutable_data_or_null<A>(grads), ws.data_ptr<A>(), current_stream(x));
  });
}

}  // namespace

std::vector<at::Tensor> dw_block_forward(const at::Tensor& x, const at::Tensor& in_center, const at::Tensor& in_scale,
                                         const at::Tensor& in_shift, const at::Tensor& weight_in,
                                         const at::Tensor& bias, const at::Tensor& gamma, const at::Tensor& beta,
                                         const at::Tensor& mean, const at::Tensor& rstd, bool batch_stats, double eps,
                                         int64_t act) {
  const char* op = "dw_block_forward";
  const DwCall c = dw_call(op, x, in_center, in_scale, in_shift, weight_in, bias, gamma, act);
  check_per_channel(op, "beta", beta, c.C, c.acc);
  if (!batch_stats) {
    check_per_channel(op, "mean", mean, c.C, c.acc);
    check_per_channel(op, "rstd", rstd, c.C, c.acc);
  }
  if (cpu::use_exact_training(x.scalar_type(), batch_stats, per_image_count(x))) {
    // the fp64 kernels, rounded once at the end (kernel_api.h; the CPU backend's rule)
    using cpu::to_double;
    auto o = dw_block_forward(to_double(x), to_double(in_center), to_double(in_scale), to_double(in_shift),
                              to_double(weight_in), to_double(bias), to_double(gamma), to_double(beta),
                              to_double(mean), to_double(rstd), batch_stats, eps, act);
    return {o[0].to(x.scalar_type()), o[1].to(c.acc), o[2].to(c.acc), o[3].to(c.acc)};
  }
  DeviceGuard guard(x);
  const auto opts = gamma.options();
  at::Tensor y = cpu::poisoned(at::empty_like(x));
  at::Tensor mean_out = batch_stats ? cpu::poisoned(at::empty({c.C}, opts)) : mean;
  at::Tensor rstd_out = batch_stats ? cpu::poisoned(at::empty({c.C}, opts)) : rstd;
  at::Tensor var_out = batch_stats ? cpu::poisoned(at::empty({c.C}, opts)) : at::empty({0}, opts);
  launch_forward(c, x, bias, gamma, beta, mean_out, rstd_out, batch_stats ? var_out : at::Tensor(), batch_stats, eps,
                 y);
  if (!batch_stats) return {y, at::empty({0}, opts), at::empty({0}, opts), var_out};
  return {y, mean_out, rstd_out, var_out};
}

std::vector<at::Tensor> dw_block_batch_stats(const at::Tensor& x, const at::Tensor& in_center,
                                             const at::Tensor& in_scale, const at::Tensor& in_shift,
                                             const at::Tensor& weight_in, const at::Tensor& bias, int64_t act) {
  const at::Tensor unused = at::zeros({x.size(1)}, x.options().dtype(acc_dtype(x)));  // gamma/beta: apply only
  const DwCall c = dw_call("dw_block_batch_stats", x, in_center, in_scale, in_shift, weight_in, bias, unused, act);
  DeviceGuard guard(x);
  at::Tensor mean = cpu::poisoned(at::empty({c.C}, unused.options()));
  at::Tensor rstd = at::empty({c.C}, unused.options());
  at::Tensor var = cpu::poisoned(at::empty({c.C}, unused.options()));
  launch_forward(c, x, bias, unused, unused, mean, rstd, var, true, 1.0 /* eps: rstd unused */, at::Tensor());
  return {mean, var};
}

std::vector<at::Tensor> dw_block_backward(const at::Tensor& dy_in, const at::Tensor& x, const at::Tensor& in_center,
                                          const at::Tensor& in_scale, const at::Tensor& in_shift,
                                          const at::Tensor& weight_in, const at::Tensor& bias, const at::Tensor& gamma,
                                          const at::Tensor& mean, const at::Tensor& rstd, bool batch_stats,
                                          const at::Tensor& dy_means, int64_t act) {
  const char* op = "dw_block_backward";
  const DwCall c = dw_call(op, x, in_center, in_scale, in_shift, weight_in, bias, gamma, act);
  check_per_channel(op, "mean", mean, c.C, c.acc);
  check_per_channel(op, "rstd", rstd, c.C, c.acc);
  const bool sums_given = dy_means.numel() > 0;
  if (sums_given) {
    TORCH_CHECK(batch_stats, op, ": dy_means is only meaningful with batch statistics");
    check_on_device(op, "dy_means", dy_means);
    TORCH_CHECK(dy_means.dim() == 2 && dy_means.size(0) == 3 && dy_means.size(1) == c.C &&
                    dy_means.scalar_type() == c.acc,
                op, ": dy_means must be a ", c.acc, " (3, ", c.C, ") tensor, got ", dy_means.scalar_type(), " ",
                dy_means.sizes());
  }
  const at::Tensor dy = dense_grad_output(op, dy_in, x, c.p);
  if (!sums_given && cpu::use_exact_training(x.scalar_type(), batch_stats, per_image_count(x))) {
    using cpu::to_double;
    auto o = dw_block_backward(to_double(dy), to_double(x), to_double(in_center), to_double(in_scale),
                               to_double(in_shift), to_double(weight_in), to_double(bias), to_double(gamma),
                               to_double(mean), to_double(rstd), batch_stats, to_double(dy_means), act);
    return {o[0].to(x.scalar_type()), o[1].to(weight_in.scalar_type()), o[2].to(bias.scalar_type()), o[3].to(c.acc),
            o[4].to(c.acc), o[5].to(c.acc), o[6].to(c.acc)};
  }
  DeviceGuard guard(x);
  const auto opts = gamma.options();
  at::Tensor dx = cpu::poisoned(at::empty_like(x));
  // (sum dy, sum dy*ghat, dhat) after pass 1 (launch_recentre_sums), or the given global means (the same
  // three, as means)
  at::Tensor sums = cpu::poisoned(at::empty({c.C, 3}, opts));
  if (sums_given) sums.copy_(dy_means.t());
  // (dw taps, db, din_scale = sum du*(x - in_center), din_shift = sum du)
  at::Tensor grads = cpu::poisoned(at::empty({c.C, dw_grad_columns(c.k)}, opts));
  launch_backward(c, dy, x, bias, gamma, mean, rstd, batch_stats, sums_given, dx, sums, grads);
  const int64_t k = c.k;
  const bool has_affine = c.scale.numel() > 0;
  at::Tensor dweight = grads.narrow(1, 0, k * k).to(c.weight.scalar_type()).reshape(c.weight.sizes()).contiguous();
  at::Tensor dbias = grads.select(1, k * k).to(bias.scalar_type()).contiguous();
  at::Tensor din_scale = has_affine ? grads.select(1, k * k + 1).contiguous() : at::empty({0}, opts);
  at::Tensor din_shift = has_affine ? grads.select(1, k * k + 2).contiguous() : at::empty({0}, opts);
  at::Tensor dgamma = sums_given ? at::empty({0}, opts) : sums.select(1, 1).contiguous();
  at::Tensor dbeta = sums_given ? at::empty({0}, opts) : sums.select(1, 0).contiguous();
  return {dx, dweight, dbias, dgamma, dbeta, din_scale, din_shift};
}

at::Tensor dw_block_backward_reduce(const at::Tensor& dy_in, const at::Tensor& x, const at::Tensor& in_center,
                                    const at::Tensor& in_scale, const at::Tensor& in_shift, const at::Tensor& weight_in,
                                    const at::Tensor& bias, const at::Tensor& mean, const at::Tensor& rstd,
                                    int64_t act) {
  const char* op = "dw_block_backward_reduce";
  const DwCall c = dw_call(op, x, in_center, in_scale, in_shift, weight_in, bias, mean, act);
  check_per_channel(op, "rstd", rstd, c.C, c.acc);
  const at::Tensor dy = dense_grad_output(op, dy_in, x, c.p);
  DeviceGuard guard(x);
  at::Tensor sums = cpu::poisoned(at::empty({c.C, 3}, mean.options()));
  launch_backward(c, dy, x, bias, mean /* gamma: unused by pass 1 */, mean, rstd, true, false, at::Tensor(), sums,
                  at::Tensor());
  return sums.t().contiguous();  // (3, C): sum dy, sum dy*ghat, sum ghat
}

}  // namespace CMK_KNS
}  // namespace cmk
