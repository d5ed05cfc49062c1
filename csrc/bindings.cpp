// Python bindings of the C++ launchers. The ops themselves (schemas, fake impls, autograd) are
// registered in convmixer_kernels/_ops.py; these functions are the per-backend launchers it calls.
#include <torch/extension.h>

#include "cpu/conv_act_bn.h"
#include "cpu/dw_block.h"

#include "cuda/launchers.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "convmixer_kernels C++ launchers";
  m.def("dw_block_forward_cpu", &cmk::cpu::dw_block_forward, "fused depthwise block forward (CPU)");
  m.def("dw_block_backward_cpu", &cmk::cpu::dw_block_backward, "fused depthwise block backward (CPU)");
  m.def("dw_block_batch_stats_cpu", &cmk::cpu::dw_block_batch_stats, "depthwise block batch statistics (CPU)");
  m.def("dw_block_backward_reduce_cpu", &cmk::cpu::dw_block_backward_reduce, "depthwise block backward sums (CPU)");
  m.def("conv_act_bn_forward_cpu", &cmk::cpu::conv_act_bn_forward, "fused conv-act-BN forward (CPU)");
  m.def("conv_act_bn_backward_cpu", &cmk::cpu::conv_act_bn_backward, "fused conv-act-BN backward (CPU)");
  m.def("set_poison_outputs", [](bool on) { cmk::cpu::poison_outputs_flag() = on; },
        "test hook: NaN-fill every output the C++ launchers allocate");
  // The CUDA kernels compiled as host C++ against csrc/cuda_emu/cuda_emu.h, on CPU tensors (tests).
  m.def("dw_block_forward_cuda_emu", &cmk::cuda_emu::dw_block_forward, "depthwise block forward (CUDA emulation)");
  m.def("dw_block_backward_cuda_emu", &cmk::cuda_emu::dw_block_backward, "depthwise block backward (CUDA emulation)");
  m.def("dw_block_batch_stats_cuda_emu", &cmk::cuda_emu::dw_block_batch_stats,
        "depthwise block batch statistics (CUDA emulation)");
  m.def("dw_block_backward_reduce_cuda_emu", &cmk::cuda_emu::dw_block_backward_reduce,
        "depthwise block backward sums (CUDA emulation)");
  m.def("conv_act_bn_forward_cuda_emu", &cmk::cuda_emu::conv_act_bn_forward, "conv-act-BN forward (CUDA emulation)");
  m.def("conv_act_bn_backward_cuda_emu", &cmk::cuda_emu::conv_act_bn_backward,
        "conv-act-BN backward (CUDA emulation)");
#ifdef CMK_WITH_CUDA
  m.def("dw_block_forward_cuda", &cmk::cuda::dw_block_forward, "fused depthwise block forward (CUDA)");
  m.def("dw_block_backward_cuda", &cmk::cuda::dw_block_backward, "fused depthwise block backward (CUDA)");
  m.def("dw_block_batch_stats_cuda", &cmk::cuda::dw_block_batch_stats, "depthwise block batch statistics (CUDA)");
  m.def("dw_block_backward_reduce_cuda", &cmk::cuda::dw_block_backward_reduce, "depthwise block backward sums (CUDA)");
  m.def("conv_act_bn_forward_cuda", &cmk::cuda::conv_act_bn_forward, "fused conv-act-BN forward (CUDA)");
  m.def("conv_act_bn_backward_cuda", &cmk::cuda::conv_act_bn_backward, "fused conv-act-BN backward (CUDA)");
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
