#pragma once
// The tiles the fused route's kernels share (contrastive_fused_stats.cuh,
// contrastive_fused_grad.cuh): a CTA of 4 warps owns 64 rows (16 per warp,
// one m16 tile) and walks 64-column tiles of the other operand, both staged
// by cp.async into swizzled shared memory (tensor_core_ptx.cuh).
//   tile_logits:        S = Q_tile K_tile^T, 16 x 64 fp32 accumulators per warp
//   tile_times_values:  out += P V_tile with P the accumulators (as A operands,
//                       FlashAttention-2's P V) and V the column tile
// Element types: bf16 and fp16 (mma m16n8k16: one k step per two 16-byte
// chunks of a row) and fp32 as TF32 (m16n8k8, rounded by cvt.rna: again one k
// step per two chunks, with the same ldmatrix addressing, Note [Fused TF32]).
//
// Note [Fused TF32]: ldmatrix (b16) hands lane (g, t) the 32-bit word t of
// row g of each 8 x 4-word matrix, which is exactly TF32's A fragment (a0..a3
// = (g, t), (g + 8, t), (g, t + 4), (g + 8, t + 4)) and B fragment (b0, b1 =
// k t, t + 4 of column g) when the four matrices are addressed as for bf16. In
// P V the accumulators hold columns 2t and 2t + 1 of rows g and g + 8, so the
// k index is relabelled (k t -> column 2t, k t + 4 -> column 2t + 1), and V's
// B fragment, V[2t][f] and V[2t + 1][f], is read by two 32-bit loads (no
// 32-bit .trans exists); the swizzle keeps those loads free of bank conflicts
// (rows 2t differ in bits 1-2 of the chunk key).
#include <cstdint>
#include <cstring>
#include <type_traits>

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

// The n8 tiles of features in a row of kChunks 16-byte chunks of T.
template <typename T, int kChunks>
constexpr int fused_feature_tiles() {
  return kChunks * (16 / int(sizeof(T))) / 8;
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
    ptx::cp_async_16(tile + (r * kChunks + ptx::staged_swizzle(r, c)) * 16, from, inside ? 16 : 0);
  }
}

// fp32 bits as TF32, rounded (Note [Fused TF32]).
template <int N>
__device__ __forceinline__ void round_to_tf32(uint32_t (&r)[N]) {
  for (int j = 0; j < N; ++j) {
    float v;
    memcpy(&v, &r[j], 4);
    r[j] = ptx::to_tf32(v);
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
    if constexpr (std::is_same_v<T, float>) round_to_tf32(fa);
    for (int pair = 0; pair < 4; ++pair) {
      uint32_t fb[4];
      const int b_row = 16 * pair + ptx::lane_b_row(lane);
      ptx::ldmatrix_x4(fb, tile_k + (b_row * kChunks + ptx::swizzle(b_row, 2 * step + ptx::lane_b_chunk(lane))) * 16);
      if constexpr (std::is_same_v<T, float>) round_to_tf32(fb);
      const uint32_t lo[2] = {fb[0], fb[1]}, hi[2] = {fb[2], fb[3]};
      if constexpr (std::is_same_v<T, float>) {
        ptx::mma_m16n8k8_tf32(acc[2 * pair], fa, lo);
        ptx::mma_m16n8k8_tf32(acc[2 * pair + 1], fa, hi);
      } else {
        ptx::mma_m16n8k16<T>(acc[2 * pair], fa, lo);
        ptx::mma_m16n8k16<T>(acc[2 * pair + 1], fa, hi);
      }
    }
  }
}

// out[n][i] += sum_c P[row][c] V[c][8 n + acc_col(lane, i)]: P from the
// accumulators, V the tile (bf16/fp16: read transposed by ldmatrix .trans,
// 16 columns per k step; TF32: 8 columns per k step, Note [Fused TF32]).
template <typename T, int kChunks>
__device__ __forceinline__ void tile_times_values(float (&out)[fused_feature_tiles<T, kChunks>()][4],
                                                  const float (&p)[8][4], const unsigned char* tile_v, int lane) {
  if constexpr (std::is_same_v<T, float>) {
    // P's columns as TF32 A operands, k relabelled (Note [Fused TF32]).
    uint32_t pa[8][4];
#pragma unroll  // p and pa must stay in registers: indexed by constants only
    for (int n = 0; n < 8; ++n) {
      pa[n][0] = ptx::to_tf32(p[n][0]);
      pa[n][1] = ptx::to_tf32(p[n][2]);
      pa[n][2] = ptx::to_tf32(p[n][1]);
      pa[n][3] = ptx::to_tf32(p[n][3]);
    }
    // Lane (g, t) reads V[8 n + 2t + h][8 f + g], word g % 4 of chunk 2 f + g / 4.
    // Rows 8 n + 2t + h all have the swizzle key 2t + h < 8, which changes only
    // the low three bits of a chunk: in each block of four feature tiles (8
    // chunks) the lane reads the same 8 offsets (chunk_offset[h][j], feature
    // tile 4 block + j), so they are formed once.
    const int g = lane >> 2, t = lane & 3;
    int chunk_offset[2][4];
    for (int h = 0; h < 2; ++h) {
      for (int j = 0; j < 4; ++j) {
        chunk_offset[h][j] = ((2 * t + h) * kChunks + ptx::swizzle(2 * t + h, 2 * j + (g >> 2))) * 16 + (g & 3) * 4;
      }
    }
    constexpr int kRowBytes = kChunks * 16;
    // Four feature tiles at a time: four independent accumulation chains over the 8 k steps.
#pragma unroll  // out, too, is indexed by constants only
    for (int block = 0; block < fused_feature_tiles<T, kChunks>() / 4; ++block) {
      const unsigned char* base = tile_v + block * 8 * 16;
#pragma unroll
      for (int n = 0; n < 8; ++n) {
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const uint32_t vb[2] = {
              ptx::to_tf32(__uint_as_float(ptx::ld_shared_b32(base + 8 * n * kRowBytes + chunk_offset[0][j]))),
              ptx::to_tf32(__uint_as_float(ptx::ld_shared_b32(base + 8 * n * kRowBytes + chunk_offset[1][j])))};
          ptx::mma_m16n8k8_tf32(out[4 * block + j], pa[n], vb);
        }
      }
    }
  } else {
    for (int step = 0; step < 4; ++step) {
      const uint32_t pa[4] = {ptx::pack2<T>(p[2 * step][0], p[2 * step][1]),
                              ptx::pack2<T>(p[2 * step][2], p[2 * step][3]),
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
}

// Each (row, feature) of the warp's 16 x d block belongs to one lane: rows
// row0 + 16 warp + acc_row(lane, i) of out_rows (d wide).
template <int kFeatureTiles>
__device__ __forceinline__ void store_row_block(float* out_rows, const float (&v)[kFeatureTiles][4], int64_t row0,
                                                int64_t rows, int64_t d, int warp, int lane) {
  for (int n = 0; n < kFeatureTiles; ++n) {
    for (int i = 0; i < 4; ++i) {
      const int64_t row = row0 + 16 * warp + ptx::acc_row(lane, i);
      const int64_t feature = 8 * n + ptx::acc_col(lane, i);
      if (row < rows && feature < d) out_rows[row * d + feature] = v[n][i];
    }
  }
}

}  // namespace ssl_ops::cuda
