// Python bindings of the C++ launchers. The ops themselves (schemas, fake impls, autograd) are
// registered in convmixer_kernels/_ops.py; these functions are the per-backend launchers it calls.
#include <torch/extension.h>

#include "cpu/conv_act_bn.h"
#include "cpu/dw_block.h"

#ifdef CMK_WITH_CUDA
#include "cuda/launchers.h"
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "convmixer_kernels C++ launchers";
  m.def("dw_block_forward_cpu", &cmk::cpu::dw_block_forward, "fused depthwise block forward (CPU)");
  m.def("dw_block_backward_cpu", &cmk::cpu::dw_block_backward, "fused depthwise block backward (CPU)");
  m.def("conv_act_bn_forward_cpu", &cmk::cpu::conv_act_bn_forward, "fused conv-act-BN forward (CPU)");
  m.def("conv_act_bn_backward_cpu", &cmk::cpu::conv_act_bn_backward, "fused conv-act-BN backward (CPU)");
  m.def("set_poison_outputs", [](bool on) { cmk::cpu::poison_outputs_flag() = on; },
        "test hook: NaN-fill every output the C++ launchers allocate");
#ifdef CMK_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
