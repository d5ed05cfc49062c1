// The CUDA conv-act-BN block compiled as host C++ against the emulator (backend "cuda_emu"): the very
// kernel source of csrc/cuda/conv_act_bn.cu and its launcher, in namespace cmk::cuda_emu.
#include <ATen/ATen.h>  // before the emulator's macros

#include "../cpu/cpu_common.h"

#define CMK_CUDA_EMULATION 1
#include "../cuda/conv_act_bn.cu"
#include "../cuda/conv_act_bn_launch.cpp"
