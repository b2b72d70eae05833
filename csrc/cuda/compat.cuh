#pragma once
// One kernel source, two compilers. nvcc builds the real kernels into
// ssl_ops._C; the host C++ compiler builds the same files with SSL_OPS_CUDA_EMU
// against csrc/emu into the test-only ssl_ops._cuda_emu, where "CUDA" tensors
// are CPU tensors and kernels run on the emulator. Kernel files use only what
// this header provides for the host side: the launch wrapper, the stream and
// device guard, the launch check, the multiprocessor count and the
// registration macro.
#include <c10/core/Device.h>

#include <array>
#include <atomic>
#include <cstring>
#include <utility>

#if defined(SSL_OPS_CUDA_EMU)
#include "emu/cuda_emu.h"
#include "emu/wmma.h"
#else
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <mma.h>
#endif

namespace ssl_ops::cuda {

#if defined(SSL_OPS_CUDA_EMU)
inline constexpr c10::DeviceType kKernelDevice = c10::kCPU;
struct DeviceGuard {
  explicit DeviceGuard(c10::Device) {}
};
inline cudaStream_t current_stream(c10::Device) { return nullptr; }
inline void check_launch() { ::ssl_emu::check_launch(); }
// Few multiprocessors, so that work meant to fill a GPU splits into several
// blocks on the small shapes the emulated tests use.
inline int multiprocessor_count(c10::Device) { return 4; }
inline int current_compute_capability() { return ::ssl_emu::compute_capability(); }
inline int loaded_code_arch() { return ::ssl_emu::compute_capability(); }
// Kernels register under the emulator's library, for CPU tensors.
#define SSL_OPS_CUDA_LIBRARY_IMPL(m) TORCH_LIBRARY_IMPL(ssl_ops_emu, CPU, m)
#define SSL_DYNAMIC_SMEM(type, name) SSL_EMU_DYNAMIC_SMEM(type, name)
#else
inline constexpr c10::DeviceType kKernelDevice = c10::kCUDA;
using DeviceGuard = c10::cuda::CUDAGuard;
inline cudaStream_t current_stream(c10::Device device) {
  return c10::cuda::getCurrentCUDAStream(device.index()).stream();
}
inline void check_launch() { C10_CUDA_KERNEL_LAUNCH_CHECK(); }
// A value fixed per device for the life of the process, looked up once for
// each device (the routes ask on every call). 0 means "not yet".
using PerDeviceCache = std::array<std::atomic<int>, 64>;
template <typename Lookup>
inline int cached_for_device(PerDeviceCache& cache, int device, Lookup lookup) {
  if (device < 0 || device >= static_cast<int>(cache.size())) return lookup(device);
  int value = cache[device].load(std::memory_order_relaxed);
  if (value == 0) {
    value = lookup(device);
    cache[device].store(value, std::memory_order_relaxed);
  }
  return value;
}
inline int current_device() {
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  return device;
}
inline int multiprocessor_count(c10::Device device) {
  static PerDeviceCache cache{};
  return cached_for_device(cache, device.has_index() ? device.index() : current_device(), [](int d) {
    int count = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, d));
    return count;
  });
}
// major * 10 + minor of the current device (the kernels' device guard set it).
inline int current_compute_capability() {
  static PerDeviceCache cache{};
  return cached_for_device(cache, current_device(), [](int device) {
    int major = 0, minor = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device));
    return major * 10 + minor;
  });
}
namespace {
__global__ void arch_probe_kernel() {}
}  // namespace
// The virtual arch (__CUDA_ARCH__ / 10) of the code that runs on the current
// device: below the device's own when the build holds no code for it and the
// driver compiles older PTX (TORCH_CUDA_ARCH_LIST="7.5+PTX" on an A100), so
// paths that arch's code compiled out (Note [Tensor cores per arch]) stay unused.
inline int loaded_code_arch() {
  static PerDeviceCache cache{};
  return cached_for_device(cache, current_device(), [](int) {
    cudaFuncAttributes attributes{};  // of the code loaded for the current device
    C10_CUDA_CHECK(cudaFuncGetAttributes(&attributes, arch_probe_kernel));
    return attributes.ptxVersion;
  });
}
#define SSL_OPS_CUDA_LIBRARY_IMPL(m) TORCH_LIBRARY_IMPL(ssl_ops, CUDA, m)
#define SSL_DYNAMIC_SMEM(type, name)                             \
  extern __shared__ __align__(128) unsigned char name##_bytes[]; \
  type* name = reinterpret_cast<type*>(name##_bytes)
#endif

// How many CTAs of kKernel (`threads` each, `dynamic_smem` bytes) one
// multiprocessor holds: asked of the driver once per device (registers and
// shared memory as ptxas left them); the emulator counts shared memory only
// (228 KB per multiprocessor, 1 KB of it reserved per CTA).
template <auto kKernel>
int max_ctas_per_multiprocessor(int threads, size_t dynamic_smem) {
#if defined(SSL_OPS_CUDA_EMU)
  (void)threads;
  const size_t fit = (228 * 1024) / (dynamic_smem + 1024);
  return fit < 1 ? 1 : fit > 32 ? 32 : static_cast<int>(fit);
#else
  static PerDeviceCache cache{};
  return cached_for_device(cache, current_device(), [&](int) {
    if (dynamic_smem > 48 * 1024) {
      C10_CUDA_CHECK(cudaFuncSetAttribute(kKernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(dynamic_smem)));
    }
    int ctas = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&ctas, kKernel, threads, dynamic_smem));
    return ctas < 1 ? 1 : ctas;  // 0 is the cache's "not yet"; a launch that cannot fit fails on its own
  });
#endif
}

// N values moved as one aligned access (16 bytes: one LDG.128 / STG.128).
template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T val[N];
};

// Stores 16 bytes at a 16-byte aligned address in one instruction. A Vec
// assembled value by value is stored value by value: nvcc 13 split both the
// Vec and a plain uint4 assignment into 2- and 4-byte stores (PTX of
// cosine_matrix.cu); __stwb's uint4 overload is one st.global.wb.v4.u32.
template <typename T, int N>
__device__ __forceinline__ void store16(T* dst, const Vec<T, N>& v) {
  static_assert(sizeof(v) == 16, "16-byte vectors only");
#if defined(SSL_OPS_CUDA_EMU)
  // A GPU faults on a misaligned vector store; so does the emulator.
  if (reinterpret_cast<uintptr_t>(dst) % 16 != 0) ::ssl_emu::fail("misaligned 16-byte store");
  std::memcpy(dst, &v, 16);
#else
  uint4 bits;
  memcpy(&bits, &v, 16);
  __stwb(reinterpret_cast<uint4*>(dst), bits);
#endif
}

// Planted numeric bugs: under the emulator a test can switch one on
// (ssl_emu::set_planted_bug) to prove that the kernel tests catch it; in the
// real build the condition is the constant false and compiles away.
#if defined(SSL_OPS_CUDA_EMU)
#define SSL_OPS_PLANTED(bug) (::ssl_emu::planted_bug() == ::ssl_emu::PlantedBug::bug)
#else
#define SSL_OPS_PLANTED(bug) false
#endif

// The one place kernels are launched: <<<...>>> under nvcc, the emulator on the
// host. Launch errors are checked here, so no call site can forget.
template <typename... Params, typename... Args>
void launch_kernel(
    void (*kernel)(Params...), dim3 grid, dim3 block, size_t dynamic_smem, cudaStream_t stream,
    Args&&... args) {
  // Past 48 KB of dynamic shared memory a kernel must opt in (the emulator
  // refuses a launch that did not, as the GPU does).
  constexpr size_t kDefaultDynamicSmem = 48 * 1024;
#if defined(SSL_OPS_CUDA_EMU)
  if (dynamic_smem > kDefaultDynamicSmem) ::ssl_emu::allow_dynamic_smem(reinterpret_cast<const void*>(kernel), dynamic_smem);
  ::ssl_emu::launch(kernel, grid, block, dynamic_smem, stream, std::forward<Args>(args)...);
#else
  if (dynamic_smem > kDefaultDynamicSmem) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(dynamic_smem)));
  }
  kernel<<<grid, block, dynamic_smem, stream>>>(std::forward<Args>(args)...);
#endif
  check_launch();
}

}  // namespace ssl_ops::cuda
