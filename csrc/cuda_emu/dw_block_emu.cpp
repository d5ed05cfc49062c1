// The CUDA depthwise block compiled as host C++ against the emulator (backend "cuda_emu"): the very
// kernel source of csrc/cuda/dw_block.cu and its launcher, in namespace cmk::cuda_emu.
#include <ATen/ATen.h>  // before the emulator's macros

#include "../cpu/cpu_common.h"

#define CMK_CUDA_EMULATION 1
#include "../cuda/dw_block.cu"
#include "../cuda/dw_block_launch.cpp"
