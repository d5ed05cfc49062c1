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
  check_per_channel(op, "gamma", gamma, C, acc_dtype(x));
}

// After the checks. stored: the dtype the caller gets y in (x's, but on the exact path).
std::vector<at::Tensor> forward_impl(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                                     const at::Tensor& gamma, const at::Tensor& beta, const at::Tensor& mean,
                                     const at::Tensor& rstd, bool batch_stats, double eps, int64_t act, int64_t patch,
                                     bool save_t, bool apply_bn, ScalarKind stored) {
  const PatchGemm g = make_patch_gemm(x, weight, patch);
  DeviceGuard guard(x);
  const Problem p = make_problem(x, g.Cout, g.Ho, g.Wo, act);
  const LaunchShape s = launch_shape(p);
  const at::ScalarType acc = acc_dtype(x);
  // GEMM in the accumulation dtype (T stays in it until t = T + b is rounded once, as PyTorch's conv does).
  at::Tensor T = gemm_forward(g, patches(g, x).to(acc), weight.reshape({g.Cout, g.K}).to(acc));
  const auto opts = gamma.options();
  at::Tensor mean_out = batch_stats ? cpu::poisoned(at::empty({g.Cout}, opts)) : mean;
  at::Tensor rstd_out = batch_stats ? cpu::poisoned(at::empty({g.Cout}, opts)) : rstd;
  at::Tensor var_out = batch_stats ? cpu::poisoned(at::empty({g.Cout}, opts)) : at::empty({0}, opts);
  at::Tensor y = cpu::poisoned(at::empty_like(T, T.options().dtype(x.scalar_type())));
  at::Tensor t = save_t ? cpu::poisoned(at::empty_like(T, T.options().dtype(x.scalar_type()))) : at::empty({0}, x.options());
  with_acc_type(acc, [&](auto a) {
    using A = decltype(a);
    using K = ConvActBnLaunch<A>;
    at::Tensor ws = workspace(x, batch_stats ? K::workspace_elems(p, s) : 0, acc);
    K::forward(p, s, stored, T.data_ptr<A>(), bias.const_data_ptr(), gamma.const_data_ptr<A>(),
               beta.const_data_ptr<A>(), mean_out.data_ptr<A>(), rstd_out.data_ptr<A>(),
               batch_stats ? var_out.data_ptr<A>() : nullptr, batch_stats, static_cast<A>(eps), apply_bn, y.data_ptr(),
               save_t ? t.data_ptr() : nullptr, ws.data_ptr<A>(), current_stream(x));
  });
  if (!batch_stats) return {y, t, at::empty({0}, opts), at::empty({0}, opts), var_out};
  return {y, t, mean_out, rstd_out, var_out};
}

// After the checks; dy dense in the output layout. stored: as in forward_impl.
std::vector<at::Tensor> backward_impl(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight,
                                      const at::Tensor& bias, const at::Tensor& gamma, const at::Tensor& mean,
                                      const at::Tensor& rstd, const at::Tensor& t_saved, const at::Tensor& dmean,
                                      const at::Tensor& drstd, bool batch_stats, int64_t act, int64_t patch,
                                      bool apply_bn, bool need_dx, ScalarKind stored) {
  const PatchGemm g = make_patch_gemm(x, weight, patch);
  DeviceGuard guard(x);
  const auto fmt = g.cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  const Problem p = make_problem(x, g.Cout, g.Ho, g.Wo, act);
  const LaunchShape s = launch_shape(p);
  const at::ScalarType acc = acc_dtype(x);
  const at::Tensor W2 = weight.reshape({g.Cout, g.K});
  const at::Tensor Z = patches(g, x);
  const bool have_t = t_saved.defined() && t_saved.numel() > 0;
  // Recompute T = Z W^T without a saved t (cheap when K = Cin*p*p is small, as in the stem); the kernels add b.
  const at::Tensor t = have_t ? t_saved.contiguous(fmt) : at::Tensor();
  const at::Tensor T_acc = have_t ? at::Tensor() : gemm_forward(g, Z.to(acc), W2.to(acc));
  // Gradients of the batch mean and rstd (a deferred BN only; empty: zero).
  const at::Tensor dm = apply_bn ? at::Tensor() : dmean, dr = apply_bn ? at::Tensor() : drstd;
  const auto opts = gamma.options();
  // (sum dy, sum dy*ghat, dhat) with apply_bn (launch_recentre_sums in training; sum ghat in eval)
  at::Tensor sums = cpu::poisoned(at::empty({g.Cout, 3}, opts));
  at::Tensor sum_dt = cpu::poisoned(at::empty({g.Cout}, opts));
  at::Tensor dT = cpu::poisoned(at::empty_like(dy, dy.options(), fmt));
  with_acc_type(acc, [&](auto a) {
    using A = decltype(a);
    using K = ConvActBnLaunch<A>;
    at::Tensor ws = workspace(x, K::workspace_elems(p, s), acc);
    K::backward(p, s, stored, dy.const_data_ptr(), have_t ? t.const_data_ptr() : nullptr, data_or_null<A>(T_acc),
                bias.const_data_ptr(), gamma.const_data_ptr<A>(), mean.const_data_ptr<A>(), rstd.const_data_ptr<A>(),
                data_or_null<A>(dm), data_or_null<A>(dr), batch_stats, apply_bn, dT.data_ptr(), sums.data_ptr<A>(),
                sum_dt.data_ptr<A>(), ws.data_ptr<A>(), current_stream(x));
  });
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
  const at::Tensor dgamma = apply_bn ? sums.select(1, 1).contiguous() : at::zeros({g.Cout}, opts);
  const at::Tensor dbeta = apply_bn ? sums.select(1, 0).contiguous() : at::zeros({g.Cout}, opts);
  return {dx, dW2.to(weight.scalar_type()).view(weight.sizes()), sum_dt.to(bias.scalar_type()), dgamma, dbeta};
}

}  // namespace

std::vector<at::Tensor> conv_act_bn_forward(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                                            const at::Tensor& gamma, const at::Tensor& beta, const at::Tensor& mean,
                                            const at::Tensor& rstd, bool batch_stats, double eps, int64_t act,
                                            int64_t patch, bool save_t, bool apply_bn) {
  const char* op = "conv_act_bn_forward";
  check_cab(op, x, weight, bias, gamma, patch);
  const PatchGemm g = make_patch_gemm(x, weight, patch);
  const at::ScalarType acc = acc_dtype(x);
  check_per_channel(op, "beta", beta, g.Cout, acc);
  if (!batch_stats) {
    check_per_channel(op, "mean", mean, g.Cout, acc);
    check_per_channel(op, "rstd", rstd, g.Cout, acc);
  }
  const ScalarKind stored = scalar_kind(op, x.scalar_type());
  if (cpu::use_exact_training(x.scalar_type(), batch_stats, g.N * g.Ho * g.Wo)) {
    // the fp64 kernels, rounded once at the end (kernel_api.h; the CPU backend's rule); a deferred BN's
    // statistics are of g rounded to x's dtype (stored)
    using cpu::to_double;
    auto o = forward_impl(to_double(x), to_double(weight), to_double(bias), to_double(gamma), to_double(beta),
                          to_double(mean), to_double(rstd), batch_stats, eps, act, patch, save_t, apply_bn, stored);
    return {o[0].to(x.scalar_type()), o[1].to(x.scalar_type()), o[2].to(acc), o[3].to(acc), o[4].to(acc)};
  }
  return forward_impl(x, weight, bias, gamma, beta, mean, rstd, batch_stats, eps, act, patch, save_t, apply_bn, stored);
}

std::vector<at::Tensor> conv_act_bn_backward(const at::Tensor& dy_in, const at::Tensor& x, const at::Tensor& weight,
                                             const at::Tensor& bias, const at::Tensor& gamma, const at::Tensor& mean,
                                             const at::Tensor& rstd, const at::Tensor& t_saved,
                                             const at::Tensor& dmean, const at::Tensor& drstd, bool batch_stats,
                                             int64_t act, int64_t patch, bool apply_bn, bool need_dx) {
  const char* op = "conv_act_bn_backward";
  check_cab(op, x, weight, bias, gamma, patch);
  const PatchGemm g = make_patch_gemm(x, weight, patch);
  const at::ScalarType acc = acc_dtype(x);
  check_per_channel(op, "mean", mean, g.Cout, acc);
  check_per_channel(op, "rstd", rstd, g.Cout, acc);
  if (!apply_bn && dmean.numel() > 0) check_per_channel(op, "dmean", dmean, g.Cout, acc);
  if (!apply_bn && drstd.numel() > 0) check_per_channel(op, "drstd", drstd, g.Cout, acc);
  check_on_device(op, "grad_output", dy_in);
  TORCH_CHECK(dy_in.dim() == 4 && dy_in.size(0) == g.N && dy_in.size(1) == g.Cout && dy_in.size(2) == g.Ho &&
                  dy_in.size(3) == g.Wo,
              op, ": grad_output has shape ", dy_in.sizes(), ", expected (", g.N, ", ", g.Cout, ", ", g.Ho, ", ",
              g.Wo, ")");
  TORCH_CHECK(dy_in.scalar_type() == x.scalar_type(), op, ": grad_output dtype ", dy_in.scalar_type(),
              " differs from x dtype ", x.scalar_type());
  const bool have_t = t_saved.defined() && t_saved.numel() > 0;
  if (have_t) {
    check_on_device(op, "t", t_saved);
    TORCH_CHECK(t_saved.sizes() == dy_in.sizes() && t_saved.scalar_type() == x.scalar_type(), op,
                ": saved t must match grad_output in shape and dtype");
  }
  const at::Tensor dy = dy_in.contiguous(g.cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
  const ScalarKind stored = scalar_kind(op, x.scalar_type());
  if (cpu::use_exact_training(x.scalar_type(), batch_stats, g.N * g.Ho * g.Wo)) {
    // t recomputed in fp64 from x (a saved t is rounded to x's dtype), as on the CPU
    using cpu::to_double;
    auto o = backward_impl(to_double(dy), to_double(x), to_double(weight), to_double(bias), to_double(gamma),
                           to_double(mean), to_double(rstd), at::Tensor(), to_double(dmean), to_double(drstd),
                           batch_stats, act, patch, apply_bn, need_dx, stored);
    return {o[0].to(x.scalar_type()), o[1].to(weight.scalar_type()), o[2].to(bias.scalar_type()), o[3].to(acc),
            o[4].to(acc)};
  }
  return backward_impl(dy, x, weight, bias, gamma, mean, rstd, t_saved, dmean, drstd, batch_stats, act, patch, apply_bn,
                       need_dx, stored);
}

}  // namespace CMK_KNS
}  // namespace cmk
