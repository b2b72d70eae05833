// The CUDA source csrc/cuda/contrastive_clip.cu compiled as host C++ against the emulator
// (SSL_OPS_CUDA_EMU is set by setup.py); one wrapper per .cu file.
#include "../cuda/contrastive_clip.cu"
