#pragma once
// One 64 x 64 tile of dot products (32 x 32 for double) in registers, for the
// cosine-similarity matrix: acc[i][j] = rows[r0 + R ty + i] . cols[c0 + R tx + j]
// (R = tile / 16, 256 threads as 16 x 16, zero outside the matrices). Two paths,
// both run on the GPU and on the emulator: tensor cores (WMMA, fp32
// accumulation) for fp16/bf16 and for fp32 where torch allows TF32 (Note
// [Tensor cores per arch], tensor_core_arch.h), and the exact FMA path (fp32;
// fp64 for double), staged kTileK features at a time through shared memory.
#include <cstdint>
#include <type_traits>

#include <ATen/Context.h>

#include "acc_type.cuh"
#include "compat.cuh"
#include "tensor_core_arch.h"

namespace ssl_ops::cuda {

constexpr int kTileK = 32;         // features per shared-memory stage
constexpr int kTileThreads = 256;  // 16 x 16 threads

// Rows and columns of an S tile: 64 (4 x 4 per thread); 32 for double, to keep
// the static shared memory under 48 KB.
template <typename T>
constexpr int tile_size() {
  return sizeof(acc_t<T>) == 8 ? 32 : 64;
}

// Shared-memory stages of the S tile, feature-major so each thread reads its
// four rows (columns) of one feature together.
template <typename A, int kTile>
struct DotStage {
  A a[kTileK][kTile + 1];
  A b[kTileK][kTile + 1];
};

// Tensor-core operand types per input dtype (fp32 inputs run as TF32).
template <typename T>
struct Wmma;
template <>
struct Wmma<c10::Half> {
  using elem = __half;
  using operand = __half;
  static constexpr int k = 16;
};
template <>
struct Wmma<c10::BFloat16> {
  using elem = __nv_bfloat16;
  using operand = __nv_bfloat16;
  static constexpr int k = 16;
};
template <>
struct Wmma<float> {
  using elem = float;
#if SSL_OPS_ARCH_HAS_BF16_TF32_MMA
  using operand = nvcuda::wmma::precision::tf32;
#else
  using operand = float;  // no TF32 before sm_80: that path is never compiled there
#endif
  static constexpr int k = 8;
};
// Shared memory of the tensor-core S tile (64 x 64): operand stages (row-major
// rows x features, padded so every fragment starts 32-byte aligned), then the
// fp32 result that threads read their 4 x 4 values from.
template <typename T>
union alignas(128) TensorCoreStage {
  static constexpr int kLd = kTileK + 16 / int(sizeof(typename Wmma<T>::elem));  // + 16 bytes
  static constexpr int kResultLd = 64 + 4;
  struct {
    typename Wmma<T>::elem a[64][kLd];
    typename Wmma<T>::elem b[64][kLd];
  } operands;
  float result[64][kResultLd];
};

// acc[i][j] = rows[r0 + R ty + i] . cols[c0 + R tx + j] (0 outside the matrices),
// R = kTile / 16.
template <typename T, int kTile, int R = kTile / 16>
__device__ __forceinline__ void tile_dots(const T* rows, int64_t n_rows, int64_t r0, const T* cols,
                                          int64_t n_cols, int64_t c0, int64_t features,
                                          DotStage<acc_t<T>, kTile>& stage, acc_t<T> (&acc)[R][R]) {
  using A = acc_t<T>;
  const int tid = threadIdx.x, ty = tid / 16, tx = tid % 16;
#pragma unroll
  for (int i = 0; i < R; ++i)
#pragma unroll
    for (int j = 0; j < R; ++j) acc[i][j] = 0;
  for (int64_t k0 = 0; k0 < features; k0 += kTileK) {
    for (int e = tid; e < kTile * kTileK; e += kTileThreads) {
      const int r = e / kTileK, k = e % kTileK;
      const int64_t feature = k0 + k;
      const bool in_k = feature < features;
      stage.a[k][r] = (in_k && r0 + r < n_rows) ? static_cast<A>(rows[(r0 + r) * features + feature]) : A(0);
      stage.b[k][r] = (in_k && c0 + r < n_cols) ? static_cast<A>(cols[(c0 + r) * features + feature]) : A(0);
    }
    __syncthreads();
#pragma unroll 4
    for (int k = 0; k < kTileK; ++k) {
      A a[R], b[R];
#pragma unroll
      for (int i = 0; i < R; ++i) a[i] = stage.a[k][ty * R + i];
#pragma unroll
      for (int j = 0; j < R; ++j) b[j] = stage.b[k][tx * R + j];
#pragma unroll
      for (int i = 0; i < R; ++i)
#pragma unroll
        for (int j = 0; j < R; ++j) acc[i][j] += a[i] * b[j];
    }
    __syncthreads();
  }
}

// acc[i][j] as tile_dots, on tensor cores: each of the 8 warps computes a 16 x 32
// part of the 64 x 64 tile with two accumulator fragments.
template <typename T>
__device__ __forceinline__ void tile_dots_tc(const T* rows, int64_t n_rows, int64_t r0, const T* cols,
                                             int64_t n_cols, int64_t c0, int64_t features,
                                             TensorCoreStage<T>& stage, float (&acc)[4][4]) {
  if constexpr (!mma_compiled<T>()) {
    __trap();  // not on this arch; the host never launches it (mma_available)
  } else {
  using namespace nvcuda;
  using W = Wmma<T>;
  using E = typename W::elem;
  using Stage = TensorCoreStage<T>;
  const int tid = threadIdx.x, ty = tid / 16, tx = tid % 16;
  const int warp = tid / 32, warp_row = (warp / 2) * 16, warp_col = (warp % 2) * 32;
  wmma::fragment<wmma::accumulator, 16, 16, W::k, float> left, right;
  wmma::fill_fragment(left, 0.0f);
  wmma::fill_fragment(right, 0.0f);
  for (int64_t k0 = 0; k0 < features; k0 += kTileK) {
    for (int e = tid; e < 64 * kTileK; e += kTileThreads) {
      const int r = e / kTileK, k = e % kTileK;
      const int64_t feature = k0 + k;
      const bool in_k = feature < features;
      stage.operands.a[r][k] = static_cast<E>((in_k && r0 + r < n_rows) ? rows[(r0 + r) * features + feature] : T(0));
      stage.operands.b[r][k] = static_cast<E>((in_k && c0 + r < n_cols) ? cols[(c0 + r) * features + feature] : T(0));
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kTileK; kk += W::k) {
      wmma::fragment<wmma::matrix_a, 16, 16, W::k, typename W::operand, wmma::row_major> a;
      // cols^T as a column-major matrix_b: element (k, n) is cols[n][k].
      wmma::fragment<wmma::matrix_b, 16, 16, W::k, typename W::operand, wmma::col_major> b_left, b_right;
      wmma::load_matrix_sync(a, &stage.operands.a[warp_row][kk], Stage::kLd);
      wmma::load_matrix_sync(b_left, &stage.operands.b[warp_col][kk], Stage::kLd);
      wmma::load_matrix_sync(b_right, &stage.operands.b[warp_col + 16][kk], Stage::kLd);
#if SSL_OPS_ARCH_HAS_BF16_TF32_MMA
      if constexpr (std::is_same_v<T, float>) {
        for (int i = 0; i < a.num_elements; ++i) a.x[i] = wmma::__float_to_tf32(a.x[i]);
        for (int i = 0; i < b_left.num_elements; ++i) b_left.x[i] = wmma::__float_to_tf32(b_left.x[i]);
        for (int i = 0; i < b_right.num_elements; ++i) b_right.x[i] = wmma::__float_to_tf32(b_right.x[i]);
      }
#endif
      wmma::mma_sync(left, a, b_left, left);
      wmma::mma_sync(right, a, b_right, right);
    }
    __syncthreads();
  }
  wmma::store_matrix_sync(&stage.result[warp_row][warp_col], left, Stage::kResultLd, wmma::mem_row_major);
  wmma::store_matrix_sync(&stage.result[warp_row][warp_col + 16], right, Stage::kResultLd, wmma::mem_row_major);
  __syncthreads();
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = stage.result[ty * 4 + i][tx * 4 + j];
  __syncthreads();
  }
}

// Host side: calls launch(std::bool_constant<tensor cores?>) for the tile path
// of T on the current device: tensor cores where the device has them for T
// (Note [Tensor cores per arch]) and, for fp32, where torch allows TF32; the
// FMA path otherwise (always for double).
template <typename T, typename Launch>
void with_tile_path(Launch&& launch) {
  if constexpr (has_tensor_cores<T>()) {
    const bool use_mma = mma_available<T>() && (!std::is_same_v<T, float> || tf32_allowed());
    if (use_mma) {
      launch(std::true_type{});
    } else {
      launch(std::false_type{});
    }
  } else {
    launch(std::false_type{});
  }
}

// Shared memory of one S tile, for either path.
template <typename T>
union STileSmem {
  DotStage<acc_t<T>, tile_size<T>()> stage;
  TensorCoreStage<std::conditional_t<has_tensor_cores<T>(), T, float>> tc;
};

// The S tile from whichever path the kernel was instantiated for.
template <typename T, bool kTensorCores, int kTile, typename Smem, int R = kTile / 16>
__device__ __forceinline__ void s_tile(const T* rows, int64_t n_rows, int64_t r0, const T* cols, int64_t n_cols,
                                       int64_t c0, int64_t features, Smem& smem, acc_t<T> (&acc)[R][R]) {
  if constexpr (kTensorCores) {
    tile_dots_tc<T>(rows, n_rows, r0, cols, n_cols, c0, features, smem.tc, acc);
  } else {
    tile_dots<T, kTile>(rows, n_rows, r0, cols, n_cols, c0, features, smem.stage, acc);
  }
}

}  // namespace ssl_ops::cuda
