// Compiles every csrc/cuda kernel file as host C++ against the emulator
// (SSL_OPS_CUDA_EMU is set by setup.py). A new .cu file is added here too.
#include "../cuda/contrastive.cu"
#include "../cuda/ema.cu"
