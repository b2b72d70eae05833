#pragma once
// Which tensor-core paths a device pass compiles and the current device runs,
// for every kernel with a tensor-core path (the tile kernels' WMMA, the fused
// route's mma.sync in tensor_core_ptx.cuh).
#include <ATen/Context.h>

#include <algorithm>
#include <type_traits>

#include "compat.cuh"

namespace ssl_ops::cuda {

// Note [Tensor cores per arch]: mma has fp16 from sm_70 and bf16 and TF32 from
// sm_80. Each device pass compiles only what its arch has (a discarded
// tensor-core path traps, and is never launched); the host pass sees every
// path and picks one per call from the device's compute capability and the
// arch of the code loaded for it (mma_available), so one build serves sm_70 to
// sm_90, a T4 (sm_75) runs bf16 and fp32 tiles on the FMA path, and so does an
// A100 running a "7.5+PTX" build's JIT-compiled PTX. The emulator pretends to any of them
// (ssl_emu::set_compute_capability), so each choice runs under test.
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
#define SSL_OPS_ARCH_HAS_BF16_TF32_MMA 1
#else
#define SSL_OPS_ARCH_HAS_BF16_TF32_MMA 0
#endif
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 700
#define SSL_OPS_ARCH_HAS_FP16_MMA 1
#else
#define SSL_OPS_ARCH_HAS_FP16_MMA 0
#endif

// Host side: fp32 tiles run on tensor cores (TF32) only where torch allows it
// (torch.backends.cuda.matmul.allow_tf32 / set_float32_matmul_precision).
inline bool tf32_allowed() { return at::globalContext().allowTF32CuBLAS(); }

template <typename T>
constexpr bool has_tensor_cores() {
  return std::is_same_v<T, c10::Half> || std::is_same_v<T, c10::BFloat16> || std::is_same_v<T, float>;
}

// Whether this device pass compiles T's tensor-core path (Note [Tensor cores per arch]).
template <typename T>
constexpr bool mma_compiled() {
  if constexpr (std::is_same_v<T, c10::Half>) return SSL_OPS_ARCH_HAS_FP16_MMA;
  return has_tensor_cores<T>() && SSL_OPS_ARCH_HAS_BF16_TF32_MMA;
}

// Host side: whether the current device runs T's tensor-core path.
template <typename T>
bool mma_available() {
  if constexpr (!has_tensor_cores<T>()) {
    return false;
  } else {
    // Both the device and the code loaded for it (loaded_code_arch, compat.cuh).
    const int arch = std::min(current_compute_capability(), loaded_code_arch());
    return arch >= (std::is_same_v<T, c10::Half> ? 70 : 80);
  }
}

}  // namespace ssl_ops::cuda
