// The CPU backend's own fp32 GEMM, Y = epilogue(X W^T), with the pointwise block's epilogue (bias,
// activation, BN scale and shift) applied to each output tile while it is still in registers.
//
// Why our own: on AVX2 CPUs without AVX-512 (a Zen 3 here), oneDNN's fp32 matmul ran ConvMixer's
// pointwise GEMMs at 124-137 GFLOP/s on 2 threads and ONNX Runtime's MLAS at ~171, with the FMA peak
// ~200 (benchmarks/RESULTS.md, "Our own fp32 GEMM on AVX2"). This kernel is the plain Goto scheme with
// one register tile; it measured 1.0-1.2x oneDNN's rate there (169-174 GFLOP/s on a quiet machine). On AVX-512 CPUs oneDNN is not beaten by it (not
// measured), so it is the default only on AVX2 targets; set_cpu_gemm picks the route for A/B runs.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>

namespace cmk {
namespace cpu {

// What is applied to each output before it is stored: y = act(x W^T + bias) * scale + shift, each part
// optional (null pointers: none; act -1: none). Per-output-channel vectors of N floats.
struct GemmEpilogue {
  const float* bias = nullptr;
  int act = -1;
  const float* scale = nullptr;
  const float* shift = nullptr;
};

// Y (M, N) = epilogue(X W^T) in fp32. X (M, K) with row stride ldx (unit column stride); W given by its
// (n, k) strides, so W^T views are read in place (it is packed once per call). Y dense (M, N).
void sgemm_nt(const float* X, int64_t ldx, const float* W, int64_t w_sn, int64_t w_sk, float* Y, int64_t M,
              int64_t N, int64_t K, const GemmEpilogue& epilogue);

// The tensor form: X (M, K) dense fp32, W (N, K) fp32 any strides; returns a new dense (M, N).
at::Tensor sgemm_nt(const at::Tensor& X, const at::Tensor& W, const GemmEpilogue& epilogue);

// Which library the fp32 GEMMs (X W^T) run in: "own" (this file) or "onednn" (onednn_gemm.h).
// Default: "own" where the build targets AVX2 without AVX-512, "onednn" elsewhere.
bool own_sgemm_selected();
void set_cpu_gemm(const std::string& route);
std::string cpu_gemm();

}  // namespace cpu
}  // namespace cmk
