#pragma once
// Tile kernels of the contrastive losses (host code: contrastive.cu).
//
// Rows of `rows` (n_rows x D) are scored against rows of `cols` (n_cols x D):
//   S_rc = scale * (rows_r . cols_c) / (denom_r * denom_c)
// where denom = max(||x||, eps) (1 without normalisation); S is formed one
// 64 x 64 tile at a time in registers and never stored.
//
// lse_kernel: one block per 64 rows walks all column tiles keeping a
//   log-sum-exp per row, shifted by the logit bound of unit rows where it is
//   usable, online otherwise (and, with labels, the sum and count of positive
//   logits; with diagonal_logit, S_rr). Self (c == r + row_offset: the rows
//   may be a slice of the columns) is skipped with exclude_self;
//   initial_logit (MoCo's positive-key logit) starts the sum.
// grad_kernel: block (row tile, 64-wide feature chunk) walks all column tiles,
//   forms T_rc = row_term(r, c) + col_term(r, c) with
//     row_term = w_r (exp(S_rc - lse_r) - positive_rc * inv_r)
//     col_term = w_c (exp(S_rc - lse_c) - positive_rc * inv_c)
//   and accumulates out_r += scale * sum_c T_rc * cols_c / denom_c (d of the
//   normalised rows; contrastive.cu applies the normalisation backward).
//   A block covers kParts * 64 output features (up to 256 in registers), so S
//   is formed once per tile for D <= 256 and once per 256 features beyond.
//   Symmetric NT-Xent uses both terms (T = G + G^T); InfoNCE uses the row term
//   for d query and, with rows and columns swapped, the column term for d key.
//
// S tiles come from one of two paths, both run on the GPU and on the emulator:
// tensor cores (WMMA, fp32 accumulation) for fp16/bf16 inputs and for fp32
// where torch allows TF32, or the exact FMA path (fp32; fp64 for double). The
// second product of grad_kernel (T times a feature chunk) always runs on the
// FMA path in fp32, so gradients never round T to 16 bits. grad_kernel
// recomputes S once per 64-wide feature chunk.
//
// Resources (ptxas -v, sm_90, nvcc 13.0; 256 threads per block; 2026-11-28):
//   lse_kernel   online shift: 101-106 registers (fp16, bf16, fp32 on either
//                path), 94 (fp64); bounded shift: 101-126, 78 (fp64); 17-18 KB
//                shared memory; no spills.
//   grad_kernel  kParts 1: 123-163 registers; kParts 2: 128-254; kParts 4:
//                168-255 (TF32 at 254-255); no spills; 34-35 KB shared memory
//                (fp64: 27 KB). (Re-measured after the chunk product became
//                add_chunk_product, shared with contrastive_pairs.cuh.)
// With 64K registers per SM, two 256-thread blocks fit at up to 128
// registers, one above that (8 warps). Register pressure, spills and
// occupancy are first on the list once a GPU is available to measure.
#include <cstdint>
#include <limits>
#include <algorithm>
#include <type_traits>

#include <ATen/Context.h>

#include "compat.cuh"
#include "tensor_core_arch.h"

namespace ssl_ops::cuda {

constexpr int kTileK = 32;         // features per shared-memory stage
constexpr int kTileThreads = 256;  // 16 x 16 threads
constexpr int kChunk = 64;         // features per shared-memory part of grad_kernel, 4 per thread

template <typename T>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};
template <typename T>
using acc_t = typename AccType<T>::type;

// Rows and columns of an S tile: 64 (4 x 4 per thread); 32 for double, to keep
// the static shared memory under 48 KB.
template <typename T>
constexpr int tile_size() {
  return sizeof(acc_t<T>) == 8 ? 32 : 64;
}

template <typename A>
__device__ __forceinline__ A device_exp(A x) {
  return exp(x);
}
template <>
__device__ __forceinline__ float device_exp<float>(float x) {
  return expf(x);
}

template <typename A>
__device__ __forceinline__ A negative_infinity() {
  return -std::numeric_limits<A>::infinity();
}

template <typename T>
struct LseParams {
  const T* rows;
  const T* cols;
  const acc_t<T>* row_denom;
  const acc_t<T>* col_denom;
  int64_t n_rows, n_cols, features;
  acc_t<T> scale;
  const int64_t* labels;          // positives by equal labels (symmetric), or null
  int64_t row_offset;             // row r is column r + row_offset (labels, self)
  bool exclude_self;
  const acc_t<T>* initial_logit;  // per row, or null
  bool bounded;                   // launch the kBounded kernel: logits lie in [-bound, bound]
  acc_t<T> bound;
  acc_t<T>* lse;
  acc_t<T>* positive_sum;         // with labels
  int64_t* positive_count;        // with labels
  acc_t<T>* diagonal_logit;       // S_r,r+row_offset, or null
};

template <typename T>
struct GradParams {
  const T* rows;
  const T* cols;
  const acc_t<T>* row_denom;
  const acc_t<T>* col_denom;
  int64_t n_rows, n_cols, features;
  acc_t<T> scale;
  const int64_t* labels;  // positives by equal labels; null: the diagonal is the positive
  // Indices into labels (and of self) are r + row_offset and c + col_offset:
  // rows and cols may be slices of the rows the labels describe.
  int64_t row_offset, col_offset;
  bool exclude_self;
  bool row_term, col_term;
  const acc_t<T>* row_lse;
  const acc_t<T>* row_weight;
  const acc_t<T>* row_inv_positives;  // 1 / |P(r)|; null: 1
  const acc_t<T>* col_lse;
  const acc_t<T>* col_weight;
  const acc_t<T>* col_inv_positives;
  bool has_positives;  // false: no positive among the columns (MoCo: it is the positive key)
  acc_t<T>* out;       // n_rows x features
};

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

// Sum (or max) over the 16 threads that share a row of the tile.
template <typename A>
__device__ __forceinline__ A row_sum16(A v) {
  for (int offset = 8; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}
template <typename A>
__device__ __forceinline__ A row_max16(A v) {
  for (int offset = 8; offset > 0; offset /= 2) {
    const A other = __shfl_xor_sync(0xffffffffu, v, offset);
    v = other > v ? other : v;
  }
  return v;
}

// kBounded (unit rows, logit bound usable; contrastive_check.h): every logit
// lies in [-bound, bound], so the shift is the fixed bound: each thread sums
// exp(S - bound) over its columns of every tile and the row's 16 threads add
// their sums once at the end. Otherwise an online log-sum-exp: the row's
// maximum and rescaled sum, agreed by the 16 threads after every tile.
template <typename T, bool kTensorCores, bool kBounded>
__global__ void __launch_bounds__(kTileThreads) lse_kernel(LseParams<T> p) {
  using A = acc_t<T>;
  constexpr int kTile = tile_size<T>(), R = kTile / 16;
  __shared__ STileSmem<T> smem;
  const int tid = threadIdx.x, ty = tid / 16, tx = tid % 16;
  const int64_t r0 = int64_t(blockIdx.x) * kTile;
  // Unbounded: every thread of a row keeps the same running state for its R rows.
  A run_max[R], run_sum[R], pos_sum[R];
  int64_t pos_count[R], label[R];
#pragma unroll
  for (int i = 0; i < R; ++i) {
    const int64_t r = r0 + ty * R + i;
    const bool valid = r < p.n_rows;
    const bool initial = valid && p.initial_logit;
    if constexpr (kBounded) {
      run_max[i] = p.bound;  // the initial term is added once, by the row's first thread
      run_sum[i] = (initial && tx == 0) ? device_exp(p.initial_logit[r] - p.bound) : A(0);
    } else {
      run_max[i] = initial ? p.initial_logit[r] : negative_infinity<A>();
      run_sum[i] = initial ? A(1) : A(0);
    }
    pos_sum[i] = 0;
    pos_count[i] = 0;
    label[i] = (valid && p.labels) ? p.labels[r + p.row_offset] : -1;
  }
  for (int64_t c0 = 0; c0 < p.n_cols; c0 += kTile) {
    A s[R][R];
    s_tile<T, kTensorCores, kTile>(p.rows, p.n_rows, r0, p.cols, p.n_cols, c0, p.features, smem, s);
#pragma unroll
    for (int i = 0; i < R; ++i) {
      const int64_t r = r0 + ty * R + i;
      const A row_factor = r < p.n_rows ? p.scale / p.row_denom[r] : A(0);
      A tile_max = negative_infinity<A>();
#pragma unroll
      for (int j = 0; j < R; ++j) {
        const int64_t c = c0 + tx * R + j;
        const bool candidate = c < p.n_cols && !(p.exclude_self && c == r + p.row_offset);
        s[i][j] = candidate ? s[i][j] * row_factor / p.col_denom[c] : negative_infinity<A>();
        tile_max = s[i][j] > tile_max ? s[i][j] : tile_max;
        if (p.diagonal_logit && c == r + p.row_offset && r < p.n_rows) p.diagonal_logit[r] = s[i][j];
        if (p.labels && candidate && p.labels[c] == label[i]) {
          pos_sum[i] += s[i][j];
          ++pos_count[i];
        }
      }
      if constexpr (kBounded) {
#pragma unroll
        for (int j = 0; j < R; ++j) run_sum[i] += device_exp(s[i][j] - p.bound);  // exp(-inf) = 0
        continue;
      }
      tile_max = row_max16(tile_max);
      const A new_max = tile_max > run_max[i] ? tile_max : run_max[i];
      A tile_sum = 0;
      if (new_max != negative_infinity<A>()) {
#pragma unroll
        for (int j = 0; j < R; ++j) tile_sum += device_exp(s[i][j] - new_max);
      }
      tile_sum = row_sum16(tile_sum);
      if (new_max != negative_infinity<A>()) {
        run_sum[i] = run_sum[i] * device_exp(run_max[i] - new_max) + tile_sum;
        run_max[i] = new_max;
      }
    }
  }
#pragma unroll
  for (int i = 0; i < R; ++i) {
    const int64_t r = r0 + ty * R + i;
    const A total_pos_sum = row_sum16(pos_sum[i]);
    const int64_t total_pos_count = row_sum16(pos_count[i]);
    const A total_sum = kBounded ? row_sum16(run_sum[i]) : run_sum[i];
    if (tx == 0 && r < p.n_rows) {
      p.lse[r] = run_max[i] + log(total_sum);
      if (p.labels) {
        p.positive_sum[r] = total_pos_sum;
        p.positive_count[r] = total_pos_count;
      }
    }
  }
}

// acc[i][offset + j] += sum over the tile's rows k of coef(k, ty R + i) * chunk[k][tx W + j]:
// a staged feature chunk times the T tile, for the thread's R rows and W features.
// coef is stored [k][row] (kCoefByColumn) or [row][k] (its transpose).
template <bool kCoefByColumn, int R, int W, int N, typename A, int kTile>
__device__ __forceinline__ void add_chunk_product(const A (&coef)[kTile][kTile + 1],
                                                  const A (&chunk)[kTile][kChunk + 1], A (&acc)[R][N], int offset) {
  const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
#pragma unroll 4
  for (int k = 0; k < kTile; ++k) {
    A a[R], b[W];
#pragma unroll
    for (int i = 0; i < R; ++i) a[i] = kCoefByColumn ? coef[k][ty * R + i] : coef[ty * R + i][k];
#pragma unroll
    for (int j = 0; j < W; ++j) b[j] = chunk[k][tx * W + j];
#pragma unroll
    for (int i = 0; i < R; ++i)
#pragma unroll
      for (int j = 0; j < W; ++j) acc[i][offset + j] += a[i] * b[j];
  }
}

// Shared memory of the gradient kernels: the S tile's stages, dead while a
// feature chunk is in use, and the T tile they multiply it by.
template <typename T>
struct GradSmem {
  static constexpr int kTile = tile_size<T>();
  union {
    STileSmem<T> tile;
    acc_t<T> chunk[kTile][kChunk + 1];  // one feature chunk of a tile's rows
  };
  acc_t<T> coef[kTile][kTile + 1];  // [column][row]
};

template <typename T, bool kTensorCores, int kParts>
__global__ void __launch_bounds__(kTileThreads) grad_kernel(GradParams<T> p) {
  using A = acc_t<T>;
  constexpr int kTile = tile_size<T>(), R = kTile / 16, W = kChunk / 16;
  __shared__ GradSmem<T> smem;  // chunk: cols[c0 + k][d0 + c]; coef: T_rc * scale / denom_c
  auto& coef = smem.coef;
  const int tid = threadIdx.x, ty = tid / 16, tx = tid % 16;
  const int64_t r0 = int64_t(blockIdx.x) * kTile;
  const int64_t d0 = int64_t(blockIdx.y) * kChunk * kParts;
  A row_lse[R], row_w[R], row_inv[R];
  int64_t row_label[R];
#pragma unroll
  for (int i = 0; i < R; ++i) {
    const int64_t r = r0 + ty * R + i;
    const bool valid = r < p.n_rows;
    row_lse[i] = (valid && p.row_term) ? p.row_lse[r] : A(0);
    row_w[i] = (valid && p.row_term) ? p.row_weight[r] : A(0);
    row_inv[i] = (valid && p.row_term && p.row_inv_positives) ? p.row_inv_positives[r] : A(1);
    row_label[i] = (valid && p.labels) ? p.labels[r + p.row_offset] : -1;
  }
  A out[R][W * kParts];
#pragma unroll
  for (int i = 0; i < R; ++i)
#pragma unroll
    for (int j = 0; j < W * kParts; ++j) out[i][j] = 0;

  for (int64_t c0 = 0; c0 < p.n_cols; c0 += kTile) {
    A s[R][R];
    s_tile<T, kTensorCores, kTile>(p.rows, p.n_rows, r0, p.cols, p.n_cols, c0, p.features, smem.tile, s);
#pragma unroll
    for (int j = 0; j < R; ++j) {
      const int64_t c = c0 + tx * R + j;
      const bool col_valid = c < p.n_cols;
      const A col_denom = col_valid ? p.col_denom[c] : A(1);
      const A col_lse = (col_valid && p.col_term) ? p.col_lse[c] : A(0);
      const A col_w = (col_valid && p.col_term) ? p.col_weight[c] : A(0);
      const A col_inv = (col_valid && p.col_term && p.col_inv_positives) ? p.col_inv_positives[c] : A(1);
      const int64_t col_label = (col_valid && p.labels) ? p.labels[c + p.col_offset] : -2;
#pragma unroll
      for (int i = 0; i < R; ++i) {
        const int64_t r = r0 + ty * R + i;
        const bool same = r + p.row_offset == c + p.col_offset;
        const bool valid = col_valid && r < p.n_rows && !(p.exclude_self && same);
        A t = 0;
        if (valid) {
          const A logit = s[i][j] * p.scale / (p.row_denom[r] * col_denom);
          const bool positive =
              p.has_positives && (p.labels ? col_label == row_label[i] : same);
          if (p.row_term && row_w[i] != A(0)) {
            t += row_w[i] * (device_exp(logit - row_lse[i]) - (positive ? row_inv[i] : A(0)));
          }
          if (p.col_term && col_w != A(0) && !SSL_OPS_PLANTED(kDropTransposedTerm)) {
            t += col_w * (device_exp(logit - col_lse) - (positive ? col_inv : A(0)));
          }
          t = t * p.scale / col_denom;
        }
        coef[tx * R + j][ty * R + i] = t;
      }
    }
#pragma unroll
    for (int part = 0; part < kParts; ++part) {
      for (int e = tid; e < kTile * kChunk; e += kTileThreads) {
        const int k = e / kChunk, c = e % kChunk;
        const int64_t row = c0 + k, feature = d0 + part * kChunk + c;
        smem.chunk[k][c] = (row < p.n_cols && feature < p.features)
            ? static_cast<A>(p.cols[row * p.features + feature]) : A(0);
      }
      __syncthreads();
      add_chunk_product<true, R, W>(coef, smem.chunk, out, part * W);
      __syncthreads();
    }
  }
#pragma unroll
  for (int i = 0; i < R; ++i) {
    const int64_t r = r0 + ty * R + i;
#pragma unroll
    for (int j = 0; j < W * kParts; ++j) {
      const int64_t feature = d0 + (j / W) * kChunk + tx * W + j % W;
      if (r < p.n_rows && feature < p.features) p.out[r * p.features + feature] = out[i][j];
    }
  }
}

}  // namespace ssl_ops::cuda
