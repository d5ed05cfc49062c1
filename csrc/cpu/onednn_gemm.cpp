#include "onednn_gemm.h"

#include <ATen/Config.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/cpu/Utils.h>
#include <oneapi/dnnl/dnnl_version.h>

#include "../common/block_math.h"
#include "simd.h"

namespace cmk {
namespace cpu {
namespace {

using LinearPointwise = at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                   c10::string_view, c10::List<std::optional<at::Scalar>>,
                                   std::optional<c10::string_view>);

// The typed handle of mkldnn::_linear_pointwise, or null (with the reason) when it cannot be used.
struct LinearOp {
  std::optional<c10::TypedOperatorHandle<LinearPointwise>> op;
  std::string why;
};

const LinearOp& linear_op() {
  static const LinearOp o = [] {
    LinearOp r;
    if (!at::hasMKLDNN()) {
      r.why = "at::mm (this torch build has no oneDNN)";
      return r;
    }
    const auto h = c10::Dispatcher::singleton().findOp({"mkldnn::_linear_pointwise", ""});
    if (!h || !h->hasKernelForDispatchKey(c10::DispatchKey::CPU)) {
      r.why = "at::mm (mkldnn::_linear_pointwise is not registered for the CPU in this torch build)";
      return r;
    }
    r.op = h->typed<LinearPointwise>();
    r.why = "oneDNN v" + std::to_string(DNNL_VERSION_MAJOR) + "." + std::to_string(DNNL_VERSION_MINOR) +
            " matmul with post-ops (through mkldnn::_linear_pointwise); dW = dT^T Z through at::mm";
    return r;
  }();
  return o;
}

}  // namespace

bool onednn_gemm_available() { return linear_op().op.has_value(); }

bool onednn_bf16_native() {
  static const bool native = [] {
    if (!onednn_gemm_available()) return false;
    const auto caps = at::cpu::get_cpu_capabilities();
    const auto has = [&](const char* k) {
      const auto it = caps.find(k);
      return it != caps.end() && it->second.isBool() && it->second.toBool();
    };
    return has("avx512_bf16") || has("amx_bf16");
  }();
  return native;
}

std::string gemm_library() {
  const std::string fp32 = own_sgemm_selected()
                               ? "fp32 X W^T in convmixer_kernels' own GEMM (6x" + std::to_string(2 * Simd<float>::N) +
                                     " register tile, epilogue fused; set_cpu_gemm('onednn') for oneDNN), else "
                               : "";
  return fp32 + linear_op().why + (onednn_bf16_native() ? "; bf16 eval GEMMs in native bf16 (AVX512_BF16)"
                                                 : "; bf16 GEMMs upcast to fp32");
}

at::Tensor linear(const at::Tensor& X, const at::Tensor& W, const std::optional<at::Tensor>& bias, int act) {
  TORCH_CHECK(X.dim() == 2 && W.dim() == 2 && X.size(1) == W.size(1) && X.is_contiguous() && W.is_contiguous(),
              "convmixer_kernels linear: X (M, K) and W (N, K) must be dense, got ", X.sizes(), " and ", W.sizes());
  if (X.scalar_type() == at::kFloat && W.scalar_type() == at::kFloat && own_sgemm_selected()) {
    GemmEpilogue e;
    const at::Tensor b = bias ? bias->contiguous() : at::Tensor();
    e.bias = b.defined() ? b.const_data_ptr<float>() : nullptr;
    e.act = act;
    return sgemm_nt(X, W, e);
  }
  const auto& o = linear_op();
  if (!o.op) {
    TORCH_CHECK(act < 0, "convmixer_kernels linear: activation post-ops need oneDNN; ", o.why);
    return bias ? at::addmm(*bias, X, W.t()) : at::mm(X, W.t());
  }
  // The op's attr/algorithm names: gelu with algorithm "none" is the erf form.
  const char* attr = act == kRelu ? "relu" : (act == kGelu || act == kGeluTanh) ? "gelu" : "none";
  const char* alg = act == kGeluTanh ? "tanh" : act == kGelu ? "none" : "";
  return o.op->call(X, W, bias, attr, c10::List<std::optional<at::Scalar>>(), c10::string_view(alg));
}

}  // namespace cpu
}  // namespace cmk
