#pragma once
// The warp-level tensor-core primitives of the fused kernels, as FlashAttention-2
// uses them (shared/fused-kernel-facts.md §2-3):
//   mma_m16n8k16<T>   d += A (16 x 16) B (16 x 8), bf16 or fp16 operands, fp32 accumulators
//   mma_m16n8k8_tf32  d += A (16 x 8) B (8 x 8), TF32 operands
//   ldmatrix_x4       four 8 x 8 16-bit matrices from shared memory (.trans: transposed)
//   ld_shared_b32     one 32-bit word of shared memory (TF32's P V operands)
//   exp2_ftz          2^x on the MUFU unit (ex2.approx.ftz)
//   cp_async_16       a 16-byte global -> shared copy (cp.async.cg), with
//                     cp_async_commit / cp_async_wait<N> (wait_group N)
// and the fragment layouts that feed them (the lane_* helpers and swizzle).
// On the device each is one PTX instruction; under the emulator,
// csrc/emu/tensor_core_ptx.h gives each lane exactly the PTX layout's elements.
// All need sm_80 (ldmatrix sm_75); a device pass below that traps, and the host
// never routes there (Note [Tensor cores per arch]).
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "compat.cuh"
#include "tensor_core_arch.h"

#if defined(SSL_OPS_CUDA_EMU)
#include "../emu/tensor_core_ptx.h"
#endif

namespace ssl_ops::cuda::ptx {

// ---- Fragment layouts (PTX ISA §9.7.14.5.8; g = lane / 4, t = lane % 4) ----------------
// Accumulator element i of lane l: row g + 8 (i / 2), column 2 t + i % 2.
__device__ __forceinline__ int acc_row(int lane, int i) { return (lane >> 2) + 8 * (i >> 1); }
__device__ __forceinline__ int acc_col(int lane, int i) { return 2 * (lane & 3) + (i & 1); }

// The row each lane addresses in ldmatrix_x4 for a 16 x 16 A operand (matrices:
// rows 0-7 | 8-15 at k 0-7, then at k 8-15) and its 16-byte k chunk (0 or 1).
__device__ __forceinline__ int lane_a_row(int lane) {
  // Planted bug: one lane's row address off by one (a wrong lane in a fragment).
  if (SSL_OPS_PLANTED(kFragmentLane) && lane == 5) return 6;
  return lane & 15;
}
__device__ __forceinline__ int lane_a_chunk(int lane) { return lane >> 4; }
// ldmatrix_x4 of K stored [n][k] for two n8 B operands of one k16 step:
// registers 0-1 serve n 0-7, 2-3 serve n 8-15.
__device__ __forceinline__ int lane_b_row(int lane) { return (lane & 7) + ((lane >> 4) << 3); }
__device__ __forceinline__ int lane_b_chunk(int lane) { return (lane >> 3) & 1; }
// ldmatrix_x4 .trans of V stored [k][n] for two n8 B operands of one k16 step
// (FlashAttention's P V): registers 0-1 serve n 0-7, 2-3 serve n 8-15.
__device__ __forceinline__ int lane_bt_row(int lane) { return lane & 15; }
__device__ __forceinline__ int lane_bt_chunk(int lane) { return lane >> 4; }

// Shared-memory tiles hold rows of 16-byte chunks, a multiple of 8 per row; chunk
// c of row r sits at c ^ (r % 8), so the 8 rows an ldmatrix reads fall in 8
// different bank groups (cute's Swizzle<3,3,3> on 16-bit elements, 64 per row).
// The key changes only the low three bits of c. Readers use swizzle, the
// cp.async staging staged_swizzle: the same place, but for the planted bug.
__device__ __forceinline__ int swizzle(int row, int chunk) { return chunk ^ (row & 7); }
__device__ __forceinline__ int staged_swizzle(int row, int chunk) {
  // Planted bug: the stager's key off by one ((r + 1) % 8), so its tile
  // disagrees with every reader's at any row width.
  if (SSL_OPS_PLANTED(kSwizzleOffByOne)) return chunk ^ ((row + 1) & 7);
  return swizzle(row, chunk);
}

// ---- Conversions -----------------------------------------------------------------------
template <typename T>
__device__ __forceinline__ uint32_t bits16(T v) {
  static_assert(sizeof(T) == 2, "16-bit operands only");
  uint16_t b;
  memcpy(&b, &v, 2);
  return b;
}
// Two fp32 values as one register of T pairs, `lo` in bits 0-15 (cvt.rn.*x2.f32).
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
#if defined(SSL_OPS_CUDA_EMU) || !SSL_OPS_ARCH_HAS_BF16_TF32_MMA
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return bits16(__float2bfloat16_rn(lo)) | bits16(__float2bfloat16_rn(hi)) << 16;
  } else {
    return bits16(__float2half_rn(lo)) | bits16(__float2half_rn(hi)) << 16;
  }
#else
  uint32_t out;
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(out) : "f"(hi), "f"(lo));
  } else {
    static_assert(std::is_same_v<T, __half>, "bf16 or fp16");
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(out) : "f"(hi), "f"(lo));
  }
  return out;
#endif
}
// fp32 to TF32, round to nearest, ties away from zero (cvt.rna.tf32.f32).
__device__ __forceinline__ uint32_t to_tf32(float v) {
#if defined(SSL_OPS_CUDA_EMU) || !SSL_OPS_ARCH_HAS_BF16_TF32_MMA
  uint32_t bits;
  memcpy(&bits, &v, 4);
  if ((bits & 0x7f800000u) != 0x7f800000u) bits = (bits + 0x1000u) & 0xffffe000u;
  return bits;
#else
  uint32_t out;
  asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(out) : "f"(v));
  return out;
#endif
}

// 2^x by the MUFU unit alone (ex2.approx.ftz.f32: at most 2 ulp, results below
// 2^-126 flushed to 0), where exp2f adds a subnormal range check and two
// multiplies. The fused kernels' exponents are at most 0 plus rounding, and
// their terms below 2^-126 are far below the sums' last bit.
__device__ __forceinline__ float exp2_ftz(float x) {
#if defined(SSL_OPS_CUDA_EMU)
  const float y = std::exp2(x);
  return y < 1.17549435e-38f ? 0.0f : y;
#elif defined(__CUDA_ARCH__)
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#else
  return exp2f(x);
#endif
}

// ---- mma.sync --------------------------------------------------------------------------
template <typename T>
__device__ __forceinline__ void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  static_assert(std::is_same_v<T, __nv_bfloat16> || std::is_same_v<T, __half>, "bf16 or fp16");
#if defined(SSL_OPS_CUDA_EMU)
  ::ssl_emu::mma_m16n8k16(
      std::is_same_v<T, __half> ? ::ssl_emu::MmaOperand::kFp16 : ::ssl_emu::MmaOperand::kBf16, d, a, b);
#elif SSL_OPS_ARCH_HAS_BF16_TF32_MMA
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
#else
  __trap();
#endif
}

__device__ __forceinline__ void mma_m16n8k8_tf32(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#if defined(SSL_OPS_CUDA_EMU)
  ::ssl_emu::mma_m16n8k8_tf32(d, a, b);
#elif SSL_OPS_ARCH_HAS_BF16_TF32_MMA
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#else
  __trap();
#endif
}

// ---- ldmatrix --------------------------------------------------------------------------
template <bool kTransposed = false>
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* row) {
#if defined(SSL_OPS_CUDA_EMU)
  ::ssl_emu::ldmatrix_x4(r, row, kTransposed);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 750
  const unsigned address = static_cast<unsigned>(__cvta_generic_to_shared(row));
  if constexpr (kTransposed) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(address));
  } else {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(address));
  }
#else
  (void)r;
  (void)row;
  __trap();
#endif
}

// ---- Shared-memory loads ----------------------------------------------------------------
// One 32-bit word of dynamic shared memory (4-byte aligned; the emulator checks
// both, as for ldmatrix).
__device__ __forceinline__ uint32_t ld_shared_b32(const void* p) {
#if defined(SSL_OPS_CUDA_EMU)
  return ::ssl_emu::ld_shared_b32(p);
#else
  uint32_t v;
  asm volatile("ld.shared.b32 %0, [%1];" : "=r"(v) : "r"(static_cast<unsigned>(__cvta_generic_to_shared(p))));
  return v;
#endif
}

// ---- cp.async --------------------------------------------------------------------------
// Copies src_bytes (0-16) and zero-fills the rest of the 16 (rows past the end read 0).
__device__ __forceinline__ void cp_async_16(void* shared_dst, const void* global_src, int src_bytes) {
#if defined(SSL_OPS_CUDA_EMU)
  ::ssl_emu::cp_async_16(shared_dst, global_src, static_cast<unsigned>(src_bytes));
#elif SSL_OPS_ARCH_HAS_BF16_TF32_MMA
  const unsigned address = static_cast<unsigned>(__cvta_generic_to_shared(shared_dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(address), "l"(global_src), "r"(src_bytes)
               : "memory");
#else
  (void)shared_dst;
  (void)global_src;
  (void)src_bytes;
  __trap();
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#if defined(SSL_OPS_CUDA_EMU)
  ::ssl_emu::cp_async_commit();
#elif SSL_OPS_ARCH_HAS_BF16_TF32_MMA
  asm volatile("cp.async.commit_group;" ::: "memory");
#endif
}

// Waits until at most kPending of this thread's most recent groups are in
// flight; other threads see the bytes only after a barrier.
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  if (SSL_OPS_PLANTED(kMissingWaitGroup)) return;
#if defined(SSL_OPS_CUDA_EMU)
  ::ssl_emu::cp_async_wait(kPending);
#elif SSL_OPS_ARCH_HAS_BF16_TF32_MMA
  asm volatile("cp.async.wait_group %0;" ::"n"(kPending) : "memory");
#endif
}

}  // namespace ssl_ops::cuda::ptx
