#pragma once
// Host emulation of the CUDA execution model, so the csrc/cuda kernel source
// runs on the CPU in tests (see README, "How CUDA code is tested").
//
// Every CUDA thread of a block is a user-space fiber with its own stack. The
// fibers run one at a time, each until it reaches a synchronisation point
// (__syncthreads, a warp collective) or exits; between two such points the
// threads of a block run in an order drawn from the schedule seed, so a missing
// barrier or a race on shared memory shows up as a wrong answer. Blocks run one
// after another, also in a drawn order. Global memory is host memory, so an
// AddressSanitizer build catches out-of-bounds accesses.
//
// Kernels reach this header through csrc/cuda/compat.cuh; anything a kernel
// needs that is missing here is added here, never worked around in the kernel.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>

// ---- Built-in types and qualifiers -------------------------------------------------
struct uint3 {
  unsigned int x, y, z;
};
struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1)
      : x(vx), y(vy), z(vz) {}
};
struct ssl_emu_stream;
using cudaStream_t = ssl_emu_stream*;

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
// Blocks run one at a time, so a function-local static is exactly one block's
// shared variable (uninitialised on a GPU; stale values from the previous block here).
#define __shared__ static
#define __constant__ static
constexpr int warpSize = 32;

namespace ssl_emu {

struct ThreadContext {
  uint3 thread_idx;
  uint3 block_idx;
  dim3 block_dim;
  dim3 grid_dim;
  unsigned lane;  // linear thread index % 32
  unsigned warp;  // linear thread index / 32
};

// The running CUDA thread; set by the scheduler before it resumes a fiber.
extern ThreadContext* g_current;
inline ThreadContext& current() { return *g_current; }

// ---- Synchronisation (runtime.cpp) --------------------------------------------------
void syncthreads();
// Deposits this lane's value and waits until every lane in `mask` has arrived at
// the same collective; returns the 32 lane slots. Call warp_release() after reading.
const uint64_t* warp_gather(unsigned mask, uint64_t value, const char* op);
void warp_release();
// Between warp_gather and warp_release: whether no other lane has read the
// slots yet (the other lanes are still parked in the collective).
bool warp_first_reader();
unsigned warp_existing_lanes();  // the lanes of the running thread's warp
// Stops the launch with an error (reported by check_launch()).
[[noreturn]] void fail(const char* what);
void* dynamic_smem();
size_t dynamic_smem_bytes();

// ---- Launch ------------------------------------------------------------------------
void run_grid(
    const void* kernel, dim3 grid, dim3 block, size_t dynamic_smem_bytes, size_t param_bytes,
    void (*body)(void*), void* arg);
// Throws the error of the last launch, if any (C10_CUDA_KERNEL_LAUNCH_CHECK's role).
void check_launch();
void set_schedule_seed(uint64_t seed);  // 0: threads and blocks in index order
uint64_t launch_count();

// Numeric bugs a test can plant in the kernels it runs (SSL_OPS_PLANTED in
// csrc/cuda/compat.cuh), to prove the kernel tests catch them. One at a time.
enum class PlantedBug : int {
  kNone = 0,
  kDropTransposedTerm = 1,  // the contrastive gradient without its G^T term (d K_hat on the GEMM route)
  kPositiveOffByOne = 2,    // InfoNCE: the positive of query r taken at key r + offset + 1
  // The tensor-core primitives (csrc/cuda/tensor_core_ptx.cuh):
  kFragmentLane = 3,        // one lane addresses the wrong row of an A fragment
  kMissingWaitGroup = 4,    // cp_async_wait returns without waiting
  kSwizzleOffByOne = 5,     // the cp.async staging's swizzle key is (row + 1) % 8, the readers' row % 8
  kPlainTilesAddNothing = 6,  // the fused kernels' plain tiles (Note [Fused plain tiles]) add no term
};
PlantedBug planted_bug();
void set_planted_bug(int bug);

// The compute capability the emulator reports (major * 10 + minor; default 90),
// so that the host code's choice of path per GPU generation (tensor cores for
// bf16 and TF32 from sm_80, fp16 from sm_70) runs under test for each.
int compute_capability();
void set_compute_capability(int capability);

// The CUDA version of the driver the emulator pretends to have (default 12000,
// an r525 driver): launches may pass 32764 bytes of parameters from 12010 (as
// on a GPU), else 4096. Host code that sizes its parameter tables by the
// driver (csrc/cuda/ema.cu) runs under test for both.
int driver_version();
void set_driver_version(int version);

// Tensor-core products: wmma::mma_sync calls so far (which path a kernel took),
// and the schedule seed, which also varies their summation order.
uint64_t mma_count();
// Vendor GEMMs (csrc/cuda/gemm_acc.h) called with fp16/bf16 operands so far:
// on a GPU those run on the tensor cores at the half rate.
uint64_t half_gemm_count();
void count_half_gemm();
// Runs only the last `count` blocks (by linear index) of each launch that
// follows (0: all): a test can reach the end of a grid too large to emulate
// whole, e.g. indexing past 65535 tiles.
void set_block_tail(uint64_t count);
void count_mma();
uint64_t schedule_seed();

// cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes):
// a launch of more than 48 KB of dynamic shared memory needs it first.
void allow_dynamic_smem(const void* kernel, size_t bytes);

template <typename... Params, typename... Args>
void launch(
    void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t,
    Args&&... args) {
  // Arguments convert to the parameter types as in a real launch; each thread
  // gets its own copy, as each GPU thread may modify its parameters.
  using Params_t = std::tuple<std::decay_t<Params>...>;
  struct Call {
    void (*kernel)(Params...);
    Params_t params;
  } call{kernel, Params_t(std::forward<Args>(args)...)};
  run_grid(reinterpret_cast<const void*>(kernel), grid, block, smem, (sizeof(std::decay_t<Params>) + ... + 0), [](void* p) {
    auto* c = static_cast<Call*>(p);
    Params_t local = c->params;
    std::apply(c->kernel, local);
  }, &call);
}

template <typename T>
T shuffle(unsigned mask, T value, unsigned (*source)(unsigned lane, int arg, int width), int arg,
          int width, const char* op) {
  static_assert(sizeof(T) <= sizeof(uint64_t) && std::is_trivially_copyable_v<T>,
                "warp shuffles move at most 8 bytes");
  uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  const unsigned lane = current().lane;
  const uint64_t* slots = warp_gather(mask, bits, op);
  const unsigned src = source(lane, arg, width);
  if (src != lane && !((mask >> src) & 1u)) {
    fail("a warp shuffle reads a lane outside its mask (undefined on the GPU)");
  }
  T out;
  std::memcpy(&out, &slots[src], sizeof(T));
  warp_release();
  return out;
}

inline unsigned segment_base(unsigned lane, int width) { return lane & ~unsigned(width - 1); }
inline unsigned source_idx(unsigned lane, int src, int width) {
  return segment_base(lane, width) + (unsigned(src) & unsigned(width - 1));
}
inline unsigned source_up(unsigned lane, int delta, int width) {
  return (lane & unsigned(width - 1)) >= unsigned(delta) ? lane - delta : lane;
}
inline unsigned source_down(unsigned lane, int delta, int width) {
  return (lane & unsigned(width - 1)) + delta < unsigned(width) ? lane + delta : lane;
}
inline unsigned source_xor(unsigned lane, int lane_mask, int width) {
  const unsigned src = lane ^ unsigned(lane_mask);
  return segment_base(src, width) == segment_base(lane, width) ? src : lane;
}

}  // namespace ssl_emu

#define threadIdx (::ssl_emu::current().thread_idx)
#define blockIdx (::ssl_emu::current().block_idx)
#define blockDim (::ssl_emu::current().block_dim)
#define gridDim (::ssl_emu::current().grid_dim)

// ---- Barriers, shuffles, votes -----------------------------------------------------
inline void __syncthreads() { ::ssl_emu::syncthreads(); }
// A trap stops the launch with an error, as it does on the GPU.
[[noreturn]] inline void __trap() { ::ssl_emu::fail("__trap(): the kernel reached a path it traps on"); }
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  ::ssl_emu::warp_gather(mask, 0, "__syncwarp");
  ::ssl_emu::warp_release();
}
// Every thread of the warp that exists (the emulator has no divergence to track).
inline unsigned __activemask() { return ::ssl_emu::warp_existing_lanes(); }
inline void __threadfence() {}
inline void __threadfence_block() {}

template <typename T>
T __shfl_sync(unsigned mask, T v, int src_lane, int width = warpSize) {
  return ::ssl_emu::shuffle(mask, v, &::ssl_emu::source_idx, src_lane, width, "__shfl_sync");
}
template <typename T>
T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = warpSize) {
  return ::ssl_emu::shuffle(mask, v, &::ssl_emu::source_up, int(delta), width, "__shfl_up_sync");
}
template <typename T>
T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = warpSize) {
  return ::ssl_emu::shuffle(
      mask, v, &::ssl_emu::source_down, int(delta), width, "__shfl_down_sync");
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = warpSize) {
  return ::ssl_emu::shuffle(mask, v, &::ssl_emu::source_xor, lane_mask, width, "__shfl_xor_sync");
}

inline unsigned __ballot_sync(unsigned mask, int predicate) {
  const uint64_t* slots = ::ssl_emu::warp_gather(mask, predicate != 0, "__ballot_sync");
  unsigned ballot = 0;
  for (unsigned lane = 0; lane < 32; ++lane) {
    if (((mask >> lane) & 1u) && slots[lane]) ballot |= 1u << lane;
  }
  ::ssl_emu::warp_release();
  return ballot;
}
inline int __any_sync(unsigned mask, int predicate) { return __ballot_sync(mask, predicate) != 0; }
inline int __all_sync(unsigned mask, int predicate) {
  // Lanes beyond the end of a partial warp are not in the effective mask.
  const unsigned active = __ballot_sync(mask, 1);
  return __ballot_sync(mask, predicate) == active;
}

// ---- Atomics: fibers switch only at synchronisation points, so a plain
// read-modify-write is atomic with respect to every other emulated thread.
template <typename T>
T atomicAdd(T* address, T value) {
  T old = *address;
  *address = old + value;
  return old;
}
template <typename T>
T atomicMax(T* address, T value) {
  T old = *address;
  *address = std::max(old, value);
  return old;
}
template <typename T>
T atomicMin(T* address, T value) {
  T old = *address;
  *address = std::min(old, value);
  return old;
}
template <typename T>
T atomicExch(T* address, T value) {
  T old = *address;
  *address = value;
  return old;
}
template <typename T>
T atomicCAS(T* address, T compare, T value) {
  T old = *address;
  if (old == compare) *address = value;
  return old;
}

// ---- Loads and math intrinsics -----------------------------------------------------
template <typename T>
T __ldg(const T* p) {
  return *p;
}
// The GPU's approximate versions differ in the last bits; tests use tolerances.
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __log2f(float x) { return std::log2(x); }
inline float __powf(float x, float y) { return std::pow(x, y); }
inline float __fdividef(float x, float y) { return x / y; }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __fsqrt_rn(float x) { return std::sqrt(x); }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline double rsqrt(double x) { return 1.0 / std::sqrt(x); }
inline float __saturatef(float x) { return x < 0.0f ? 0.0f : (x > 1.0f ? 1.0f : x); }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline int __float_as_int(float x) { int i; std::memcpy(&i, &x, 4); return i; }
inline unsigned __float_as_uint(float x) { unsigned i; std::memcpy(&i, &x, 4); return i; }
inline float __int_as_float(int i) { float x; std::memcpy(&x, &i, 4); return x; }
inline float __uint_as_float(unsigned i) { float x; std::memcpy(&x, &i, 4); return x; }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(unsigned(x)); }
inline int __ffs(int x) { return __builtin_ffs(x); }

// CUDA's global min/max overloads for device code.
#define SSL_EMU_MINMAX(T)                                   \
  inline T min(T a, T b) { return b < a ? b : a; }          \
  inline T max(T a, T b) { return a < b ? b : a; }
SSL_EMU_MINMAX(int)
SSL_EMU_MINMAX(unsigned int)
SSL_EMU_MINMAX(long)
SSL_EMU_MINMAX(unsigned long)
SSL_EMU_MINMAX(long long)
SSL_EMU_MINMAX(unsigned long long)
SSL_EMU_MINMAX(float)
SSL_EMU_MINMAX(double)
#undef SSL_EMU_MINMAX

// ---- Half precision: c10's types round to nearest even like cuda_fp16/cuda_bf16.
using __half = c10::Half;
using __nv_bfloat16 = c10::BFloat16;
inline float __half2float(__half h) { return static_cast<float>(h); }
inline __half __float2half(float f) { return __half(f); }
inline __half __float2half_rn(float f) { return __half(f); }
inline float __bfloat162float(__nv_bfloat16 h) { return static_cast<float>(h); }
inline __nv_bfloat16 __float2bfloat16(float f) { return __nv_bfloat16(f); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __nv_bfloat16(f); }

// Dynamic shared memory of the running block (declared through SSL_DYNAMIC_SMEM).
#define SSL_EMU_DYNAMIC_SMEM(type, name) type* name = static_cast<type*>(::ssl_emu::dynamic_smem())
