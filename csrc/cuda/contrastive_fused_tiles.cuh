#pragma once
// The tiles the fused route's kernels share (contrastive_fused_stats.cuh,
// contrastive_fused_grad.cuh): a CTA of 4 warps owns 64 rows (16 per warp,
// one m16 tile) and walks 64-column tiles of the other operand, both staged
// by cp.async into swizzled shared memory (tensor_core_ptx.cuh).
//   tile_logits:        S = Q_tile K_tile^T, 16 x 64 fp32 accumulators per warp
//   tile_times_values:  out += P V_tile with P the accumulators (as bf16/fp16 A
//                       operands, FlashAttention-2's P V) and V the column tile
//                       read transposed by ldmatrix .trans
#include <cstdint>

#include "compat.cuh"
#include "tensor_core_ptx.cuh"

namespace ssl_ops::cuda {

constexpr int kFusedRows = 64, kFusedCols = 64, kFusedThreads = 128;
// P = exp(logit - shift) <= 1 enters the query gradient's products times 2^14
// (exact in every dtype): fp16 keeps terms down to exp(-26) normal instead of
// exp(-16.6); the host divides it out.
constexpr float kFusedPScale = 16384.0f;

template <int kChunks>
constexpr size_t fused_tile_bytes() {
  return size_t(kFusedRows) * kChunks * 16;
}

// 64 rows from `first` of a (total x d) matrix into a swizzled tile, rows and
// chunks past the ends zero-filled.
template <typename T, int kChunks>
__device__ __forceinline__ void stage_rows(unsigned char* tile, const T* src, int64_t total, int64_t first, int64_t d) {
  constexpr int kPerChunk = 16 / sizeof(T);
  for (int i = threadIdx.x; i < kFusedRows * kChunks; i += kFusedThreads) {
    const int r = i / kChunks, c = i % kChunks;
    const bool inside = first + r < total && int64_t(c) * kPerChunk < d;
    const T* from = inside ? src + (first + r) * d + c * kPerChunk : src;
    ptx::cp_async_16(tile + (r * kChunks + ptx::swizzle(r, c)) * 16, from, inside ? 16 : 0);
  }
}

// acc[n][i] += S of this warp's 16 rows against the tile's columns 8 n + acc_col(lane, i).
template <typename T, int kChunks>
__device__ __forceinline__ void tile_logits(float (&acc)[8][4], const unsigned char* tile_q,
                                            const unsigned char* tile_k, int warp, int lane) {
  for (int step = 0; step < kChunks / 2; ++step) {
    uint32_t fa[4];
    const int a_row = 16 * warp + ptx::lane_a_row(lane);
    ptx::ldmatrix_x4(fa, tile_q + (a_row * kChunks + ptx::swizzle(a_row, 2 * step + ptx::lane_a_chunk(lane))) * 16);
    for (int pair = 0; pair < 4; ++pair) {
      uint32_t fb[4];
      const int b_row = 16 * pair + ptx::lane_b_row(lane);
      ptx::ldmatrix_x4(fb, tile_k + (b_row * kChunks + ptx::swizzle(b_row, 2 * step + ptx::lane_b_chunk(lane))) * 16);
      const uint32_t lo[2] = {fb[0], fb[1]}, hi[2] = {fb[2], fb[3]};
      ptx::mma_m16n8k16<T>(acc[2 * pair], fa, lo);
      ptx::mma_m16n8k16<T>(acc[2 * pair + 1], fa, hi);
    }
  }
}

// out[n][i] += sum_c P[row][c] V[c][8 n + acc_col(lane, i)]: P from the
// accumulators (16 columns per k step), V the tile read transposed.
template <typename T, int kChunks>
__device__ __forceinline__ void tile_times_values(float (&out)[kChunks][4], const float (&p)[8][4],
                                                  const unsigned char* tile_v, int lane) {
  for (int step = 0; step < 4; ++step) {
    const uint32_t pa[4] = {ptx::pack2<T>(p[2 * step][0], p[2 * step][1]), ptx::pack2<T>(p[2 * step][2], p[2 * step][3]),
                            ptx::pack2<T>(p[2 * step + 1][0], p[2 * step + 1][1]),
                            ptx::pack2<T>(p[2 * step + 1][2], p[2 * step + 1][3])};
    for (int pair = 0; pair < kChunks / 2; ++pair) {
      uint32_t fv[4];
      const int v_row = 16 * step + ptx::lane_bt_row(lane);
      ptx::ldmatrix_x4<true>(fv, tile_v + (v_row * kChunks + ptx::swizzle(v_row, 2 * pair + ptx::lane_bt_chunk(lane))) * 16);
      const uint32_t lo[2] = {fv[0], fv[1]}, hi[2] = {fv[2], fv[3]};
      ptx::mma_m16n8k16<T>(out[2 * pair], pa, lo);
      ptx::mma_m16n8k16<T>(out[2 * pair + 1], pa, hi);
    }
  }
}

// Each (row, feature) of the warp's 16 x d block belongs to one lane: rows
// row0 + 16 warp + acc_row(lane, i) of out_rows (d wide).
template <int kChunks>
__device__ __forceinline__ void store_row_block(float* out_rows, const float (&v)[kChunks][4], int64_t row0,
                                                int64_t rows, int64_t d, int warp, int lane) {
  for (int n = 0; n < kChunks; ++n) {
    for (int i = 0; i < 4; ++i) {
      const int64_t row = row0 + 16 * warp + ptx::acc_row(lane, i);
      const int64_t feature = 8 * n + ptx::acc_col(lane, i);
      if (row < rows && feature < d) out_rows[row * d + feature] = v[n][i];
    }
  }
}

}  // namespace ssl_ops::cuda
