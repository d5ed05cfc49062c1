// The GEMM view of a conv with kernel = stride = p (p = 1: the pointwise conv), shared by the CPU and
// CUDA launchers of the conv-act-BN block. Z is the input as a matrix of patches: (N*L, K) in
// channels_last, (N, K, L) in NCHW, with L = Ho*Wo and K = Cin*p*p; the product comes out dense in
// the output layout. Host-side ATen code only (views, one copy for the stem, at::mm / at::matmul).
#pragma once

#include <ATen/ATen.h>

#include "../cpu/cpu_common.h"  // is_channels_last

namespace cmk {

// Shape and dtype checks of a kernel = stride = patch conv, common to every backend's launcher.
inline void check_patch_conv(const char* op, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                             int64_t patch) {
  TORCH_CHECK(patch >= 1, op, ": patch size must be >= 1, got ", patch);
  TORCH_CHECK(weight.dim() == 4 && weight.size(1) == x.size(1) && weight.size(2) == patch && weight.size(3) == patch,
              op, ": weight must have shape (Cout, ", x.size(1), ", ", patch, ", ", patch, "), got ", weight.sizes());
  TORCH_CHECK(x.size(2) >= patch && x.size(3) >= patch, op, ": input spatial size ", x.sizes(),
              " is smaller than the patch size ", patch);
  TORCH_CHECK(weight.scalar_type() == x.scalar_type() && bias.scalar_type() == x.scalar_type(), op,
              ": weight/bias dtype must match the input dtype ", x.scalar_type());
  const int64_t C = weight.size(0);
  TORCH_CHECK(bias.dim() == 1 && bias.size(0) == C && bias.is_contiguous(), op, ": bias must have shape (", C, ")");
}

struct PatchGemm {
  bool cl;
  int64_t N, Cin, H, W, Ho, Wo, p, Cout, K;
};

inline PatchGemm make_patch_gemm(const at::Tensor& x, const at::Tensor& weight, int64_t patch) {
  PatchGemm g;
  g.cl = cpu::is_channels_last(x);
  g.N = x.size(0); g.Cin = x.size(1); g.H = x.size(2); g.W = x.size(3);
  g.p = patch; g.Ho = g.H / patch; g.Wo = g.W / patch;
  g.Cout = weight.size(0); g.K = g.Cin * patch * patch;
  return g;
}

// Z: a view for the pointwise conv, a copy for the stem (spatial size floored as PyTorch's conv does).
inline at::Tensor patches(const PatchGemm& g, const at::Tensor& x) {
  if (g.p == 1) return g.cl ? x.permute({0, 2, 3, 1}).reshape({g.N * g.H * g.W, g.Cin}) : x.reshape({g.N, g.Cin, g.H * g.W});
  at::Tensor xc = x.slice(2, 0, g.Ho * g.p).slice(3, 0, g.Wo * g.p).view({g.N, g.Cin, g.Ho, g.p, g.Wo, g.p});
  if (g.cl) return xc.permute({0, 2, 4, 1, 3, 5}).reshape({g.N * g.Ho * g.Wo, g.K});
  return xc.permute({0, 1, 3, 5, 2, 4}).reshape({g.N, g.K, g.Ho * g.Wo});
}

// T = conv(x, W) without bias, as a 4-D (N, Cout, Ho, Wo) tensor dense in the output layout.
inline at::Tensor gemm_forward(const PatchGemm& g, const at::Tensor& Z, const at::Tensor& W2) {
  if (g.cl) return at::mm(Z, W2.t()).view({g.N, g.Ho, g.Wo, g.Cout}).permute({0, 3, 1, 2});
  return at::matmul(W2, Z).view({g.N, g.Cout, g.Ho, g.Wo});
}

// dx from dZ (the gradient of the patch matrix): a view for the pointwise conv; for the stem, the
// patches scattered back, with zeros where the floored output covers no input.
inline at::Tensor fold_patches(const PatchGemm& g, const at::Tensor& dZ, const at::Tensor& x) {
  if (g.p == 1) return g.cl ? dZ.view({g.N, g.H, g.W, g.Cin}).permute({0, 3, 1, 2}) : dZ.view({g.N, g.Cin, g.H, g.W});
  at::Tensor dx = at::zeros_like(x, x.options(), g.cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
  at::Tensor dst = dx.slice(2, 0, g.Ho * g.p).slice(3, 0, g.Wo * g.p).view({g.N, g.Cin, g.Ho, g.p, g.Wo, g.p});
  if (g.cl)
    dst.permute({0, 2, 4, 1, 3, 5}).copy_(dZ.view({g.N, g.Ho, g.Wo, g.Cin, g.p, g.p}));
  else
    dst.permute({0, 1, 3, 5, 2, 4}).copy_(dZ.view({g.N, g.Cin, g.p, g.p, g.Ho, g.Wo}));
  return dx;
}

}  // namespace cmk
