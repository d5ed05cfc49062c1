// at::Tensor launchers of the fused conv -> act -> BN block (pointwise conv and patch stem) for the
// CUDA backend (and, included by csrc/cuda_emu/conv_act_bn_emu.cpp, for its host emulation).
// Torch ops used here (the sanctioned part): the GEMMs T = Z W^T, dW = dT^T Z, dZ = dT W through
// at::mm / at::matmul (cuBLAS on the GPU), the patch gather/scatter of the stem (views and one copy),
// dtype casts of the GEMM operands, and the casts of the per-channel results. Everything per element
// after the GEMM runs in the kernels of conv_act_bn.cu.
#include "../common/patch_gemm.h"
#include "launch_common.h"
#include "launchers.h"

namespace cmk {
namespace CMK_KNS {
namespace {


void check_cab(const char* op, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
               const at::Tensor& gamma, int64_t patch) {
  check_activation(op, x);
  check_on_device(op, "weight", weight);
  check_on_device(op, "bias", bias);
  check_patch_conv(op, x, weight, bias, patch);
  const int64_t C = weight.size(0);
  check_per_channel_f32(op, "gamma", gamma, C);
}

}  // namespace

std::vector<at::Tensor> conv_act_bn_forward(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                                            const at::Tensor& gamma, const at::Tensor& beta, const at::Tensor& mean,
                                            const at::Tensor& rstd, bool batch_stats, double eps, int64_t act,
                                            int64_t patch, bool save_t, bool apply_bn) {
  const char* op = "conv_act_bn_forward";
  check_cab(op, x, weight, bias, gamma, patch);
  const PatchGemm g = make_patch_gemm(x, weight, patch);
  check_per_channel_f32(op, "beta", beta, g.Cout);
  if (!batch_stats) {
    check_per_channel_f32(op, "mean", mean, g.Cout);
    check_per_channel_f32(op, "rstd", rstd, g.Cout);
  }
  DeviceGuard guard(x);
  const Problem p = make_problem(x, g.Cout, g.Ho, g.Wo, act);
  const LaunchShape s = launch_shape(p);
  // GEMM in fp32 (T stays fp32 until t = T + b is rounded once, as PyTorch's conv does).
  at::Tensor T = gemm_forward(g, patches(g, x).to(at::kFloat), weight.reshape({g.Cout, g.K}).to(at::kFloat));
  const auto f32 = gamma.options();
  at::Tensor mean_out = batch_stats ? cpu::poisoned(at::empty({g.Cout}, f32)) : mean;
  at::Tensor rstd_out = batch_stats ? cpu::poisoned(at::empty({g.Cout}, f32)) : rstd;
  at::Tensor var_out = batch_stats ? cpu::poisoned(at::empty({g.Cout}, f32)) : at::empty({0}, f32);
  at::Tensor y = cpu::poisoned(at::empty_like(T, T.options().dtype(x.scalar_type())));
  at::Tensor t = save_t ? cpu::poisoned(at::empty_like(T, T.options().dtype(x.scalar_type()))) : at::empty({0}, x.options());
  at::Tensor ws = workspace(x, batch_stats ? conv_act_bn_workspace_floats(p, s) : 0);
  conv_act_bn_forward_launch(p, s, T.data_ptr<float>(), bias.const_data_ptr(), gamma.const_data_ptr<float>(),
                             beta.const_data_ptr<float>(), mean_out.data_ptr<float>(), rstd_out.data_ptr<float>(),
                             batch_stats ? var_out.data_ptr<float>() : nullptr, batch_stats, static_cast<float>(eps),
                             apply_bn, y.data_ptr(), save_t ? t.data_ptr() : nullptr, ws.data_ptr<float>(),
                             current_stream(x));
  if (!batch_stats) return {y, t, at::empty({0}, f32), at::empty({0}, f32), var_out};
  return {y, t, mean_out, rstd_out, var_out};
}

std::vector<at::Tensor> conv_act_bn_backward(const at::Tensor& dy_in, const at::Tensor& x, const at::Tensor& weight,
                                             const at::Tensor& bias, const at::Tensor& gamma, const at::Tensor& mean,
                                             const at::Tensor& rstd, const at::Tensor& t_saved,
                                             const at::Tensor& dmean, const at::Tensor& drstd, bool batch_stats,
                                             int64_t act, int64_t patch, bool apply_bn, bool need_dx) {
  const char* op = "conv_act_bn_backward";
  check_cab(op, x, weight, bias, gamma, patch);
  const PatchGemm g = make_patch_gemm(x, weight, patch);
  check_per_channel_f32(op, "mean", mean, g.Cout);
  check_per_channel_f32(op, "rstd", rstd, g.Cout);
  // Gradients of the batch mean and rstd (a deferred BN only; empty: zero).
  const bool have_dmean = !apply_bn && dmean.numel() > 0, have_drstd = !apply_bn && drstd.numel() > 0;
  if (have_dmean) check_per_channel_f32(op, "dmean", dmean, g.Cout);
  if (have_drstd) check_per_channel_f32(op, "drstd", drstd, g.Cout);
  check_on_device(op, "grad_output", dy_in);
  TORCH_CHECK(dy_in.dim() == 4 && dy_in.size(0) == g.N && dy_in.size(1) == g.Cout && dy_in.size(2) == g.Ho &&
                  dy_in.size(3) == g.Wo,
              op, ": grad_output has shape ", dy_in.sizes(), ", expected (", g.N, ", ", g.Cout, ", ", g.Ho, ", ",
              g.Wo, ")");
  TORCH_CHECK(dy_in.scalar_type() == x.scalar_type(), op, ": grad_output dtype ", dy_in.scalar_type(),
              " differs from x dtype ", x.scalar_type());
  DeviceGuard guard(x);
  const auto fmt = g.cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  const Problem p = make_problem(x, g.Cout, g.Ho, g.Wo, act);
  const LaunchShape s = launch_shape(p);
  const at::Tensor dy = dy_in.contiguous(fmt);
  const at::Tensor W2 = weight.reshape({g.Cout, g.K});
  const at::Tensor Z = patches(g, x);
  const bool have_t = t_saved.defined() && t_saved.numel() > 0;
  at::Tensor t, T_acc;
  if (have_t) {
    check_on_device(op, "t", t_saved);
    TORCH_CHECK(t_saved.sizes() == dy.sizes() && t_saved.scalar_type() == x.scalar_type(), op,
                ": saved t must match grad_output in shape and dtype");
    t = t_saved.contiguous(fmt);
  } else {
    // Recompute T = Z W^T (cheap when K = Cin*p*p is small, as in the stem); the kernels add b.
    T_acc = gemm_forward(g, Z.to(at::kFloat), W2.to(at::kFloat));
  }
  const auto f32 = gamma.options();
  // (sum dy, sum dy*ghat, dhat) with apply_bn (launch_recentre_sums in training; sum ghat in eval)
  at::Tensor sums = cpu::poisoned(at::empty({g.Cout, 3}, f32));
  at::Tensor sum_dt = cpu::poisoned(at::empty({g.Cout}, f32));
  at::Tensor dT = cpu::poisoned(at::empty_like(dy, dy.options(), fmt));
  at::Tensor ws = workspace(x, conv_act_bn_workspace_floats(p, s));
  conv_act_bn_backward_launch(p, s, dy.const_data_ptr(), have_t ? t.const_data_ptr() : nullptr,
                              have_t ? nullptr : T_acc.const_data_ptr<float>(), bias.const_data_ptr(),
                              gamma.const_data_ptr<float>(), mean.const_data_ptr<float>(),
                              rstd.const_data_ptr<float>(), have_dmean ? dmean.const_data_ptr<float>() : nullptr,
                              have_drstd ? drstd.const_data_ptr<float>() : nullptr, batch_stats, apply_bn,
                              dT.data_ptr(), sums.data_ptr<float>(), sum_dt.data_ptr<float>(), ws.data_ptr<float>(),
                              current_stream(x));
  // GEMMs of the backward: dW = dT^T Z, dZ = dT W.
  at::Tensor dW2, dZ;
  if (g.cl) {
    const at::Tensor dTm = dT.permute({0, 2, 3, 1}).reshape({g.N * g.Ho * g.Wo, g.Cout});
    dW2 = at::mm(dTm.t(), Z);
    if (need_dx) dZ = at::mm(dTm, W2);  // (M, K)
  } else {
    const at::Tensor dTm = dT.view({g.N, g.Cout, g.Ho * g.Wo});
    const int64_t L = g.Ho * g.Wo;
    dW2 = at::mm(dTm.transpose(0, 1).reshape({g.Cout, g.N * L}), Z.transpose(0, 1).reshape({g.K, g.N * L}).t());
    if (need_dx) dZ = at::matmul(W2.t(), dTm);  // (N, K, L)
  }
  const at::Tensor dx = need_dx ? fold_patches(g, dZ, x) : at::empty({0}, x.options());
  // A deferred BN did not use gamma and beta here: their gradients are 0.
  const at::Tensor dgamma = apply_bn ? sums.select(1, 1).contiguous() : at::zeros({g.Cout}, f32);
  const at::Tensor dbeta = apply_bn ? sums.select(1, 0).contiguous() : at::zeros({g.Cout}, f32);
  return {dx, dW2.to(weight.scalar_type()).view(weight.sizes()), sum_dt.to(bias.scalar_type()), dgamma, dbeta};
}

}  // namespace CMK_KNS
}  // namespace cmk
