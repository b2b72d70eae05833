// The CUDA source csrc/cuda/contrastive_fused_fp16.cu compiled as host C++ against the emulator
// (SSL_OPS_CUDA_EMU is set by setup.py); one wrapper per .cu file.
#include "../cuda/contrastive_fused_fp16.cu"
