// The CPU backend's fp32 GEMMs through oneDNN's matmul primitive, with the bias and activation as
// post-ops where the caller asks for them.
//
// Why through an op: the torch wheel links oneDNN statically and hides its dnnl_* symbols, so dnnl.hpp
// cannot be linked against. torch registers the primitive (bias + eltwise post-op, primitives cached
// by oneDNN per shape) as mkldnn::_linear_pointwise for inductor; we call that op through the
// dispatcher. Measured on this machine (2 threads, benchmarks/RESULTS.md): 1.5-1.8x the rate of at::mm
// (MKL) for the forward's Z W^T at ConvMixer's shapes, 1.2-1.5x for dZ = dT W; at::mm stays for
// dW = dT^T Z, whose transposed operand MKL reads in place (oneDNN's op would copy it).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>

#include "sgemm.h"

namespace cmk {
namespace cpu {

// True when this torch build has oneDNN and the op above has a CPU kernel.
bool onednn_gemm_available();

// True when, in addition, the CPU has native bf16 dot products (AVX512_BF16 or AMX-BF16), so oneDNN's
// bf16 matmul runs at about twice its fp32 rate rather than emulating bf16.
bool onednn_bf16_native();

// "oneDNN v3.x matmul (mkldnn::_linear_pointwise)" or why at::mm is used instead.
std::string gemm_library();

// Y = act(X W^T + bias) as a dense (M, N) tensor of X's dtype; X (M, K) and W (N, K) dense, both fp32, or
// both bf16 (accumulated in fp32, bias and act applied in fp32, rounded once). fp32 runs in our own
// GEMM (sgemm.h) where that is selected. act: one of
// cmk::Act, or -1 for none (then bias may be absent). Falls back to at::mm (+ bias) when oneDNN is not
// available; act must then be -1.
at::Tensor linear(const at::Tensor& X, const at::Tensor& W, const std::optional<at::Tensor>& bias, int act);

// X W^T: the GEMMs of the blocks. fp32: our own kernel (sgemm.h) where selected, which reads W (a
// W^T view included) in place, else oneDNN when available; other dtypes at::mm.
inline at::Tensor mm_nt(const at::Tensor& X, const at::Tensor& W) {
  if (X.scalar_type() == at::kFloat && W.scalar_type() == at::kFloat) {
    if (own_sgemm_selected()) return sgemm_nt(X, W, GemmEpilogue{});
    if (onednn_gemm_available()) return linear(X.contiguous(), W.contiguous(), std::nullopt, -1);
  }
  return at::mm(X, W.t());
}

}  // namespace cpu
}  // namespace cmk
