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

// Stages 64 rows from `first` of a (total x d) matrix into a swizzled tile by
// cp.async, rows and chunks past the ends zero-filled. Thread x copies chunk
// x % kChunks of rows x / kChunks + i (128 / kChunks) for every tile, so its
// destinations are formed once: row i lies 2 KB further on, and its swizzle
// key repeats every 8 rows (kPeriod distinct keys); a tile then costs one
// 64-bit product and one add per chunk.
template <typename T, int kChunks>
struct RowStager {
  static constexpr int kPerChunk = 16 / sizeof(T);
  static constexpr int kPerThread = kFusedRows * kChunks / kFusedThreads;
  static constexpr int kRowStep = kFusedThreads / kChunks;
  static constexpr int kPeriod = kRowStep >= 8 ? 1 : 8 / kRowStep;
  static_assert(kFusedThreads % kChunks == 0, "whole rows per pass");
  int row, chunk;        // the first row and the chunk this thread copies
  int dst[kPeriod];      // byte offsets of rows row + i kRowStep, i < kPeriod, in a tile

  __device__ __forceinline__ RowStager() : row(threadIdx.x / kChunks), chunk(threadIdx.x % kChunks) {
    for (int i = 0; i < kPeriod; ++i) {
      const int r = row + i * kRowStep;
      dst[i] = (r * kChunks + ptx::staged_swizzle(r, chunk)) * 16;
    }
  }

  __device__ __forceinline__ void stage(unsigned char* tile, const T* src, int64_t total, int64_t first,
                                        int64_t d) const {
    // The rows of this tile that exist, from this thread's first (0 to 64: 32-bit compares below).
    const int64_t left = total - first - row;
    const int rows_left = int64_t(chunk) * kPerChunk < d ? int(left < 0 ? 0 : left > kFusedRows ? kFusedRows : left) : 0;
    const T* from = src + (first + row) * d + chunk * kPerChunk;
    const int64_t step = kRowStep * d;
#pragma unroll
    for (int i = 0; i < kPerThread; ++i, from += step) {
      const bool inside = i * kRowStep < rows_left;
      const int dst_i = dst[i % kPeriod] + (i / kPeriod) * kPeriod * kRowStep * kChunks * 16;
      ptx::cp_async_16(tile + dst_i, inside ? from : src, inside ? 16 : 0);
    }
  }
};

// A lane's ldmatrix rows in a tile, formed once: row `row` of each 16-row block
// at chunks 2 s + `chunk` for the k steps s. The swizzle key (row % 8) changes
// only a chunk's low three bits, so step s reads at at[s % 4] + 128 (s / 4)
// bytes, and block b of 16 rows b * 16 rows further on.
template <int kChunks>
struct LdmatrixRows {
  int at[4];
  __device__ __forceinline__ LdmatrixRows(int row, int chunk) {
    for (int j = 0; j < 4; ++j) at[j] = (row * kChunks + ptx::swizzle(row, 2 * j + chunk)) * 16;
  }
  __device__ __forceinline__ int step(int s, int block = 0) const {
    return at[s % 4] + 128 * (s / 4) + block * 16 * kChunks * 16;
  }
};

// The ldmatrix rows of one warp's lanes: its A rows (16 warp + lane_a_row) in
// the rows tile, the B rows (lane_b_row) and, for P V on bf16/fp16, the
// transposed rows (lane_bt_row) in the column tile.
template <int kChunks>
struct FusedLaneRows {
  LdmatrixRows<kChunks> a, b, bt;
  __device__ __forceinline__ FusedLaneRows(int warp, int lane)
      : a(16 * warp + ptx::lane_a_row(lane), ptx::lane_a_chunk(lane)),
        b(ptx::lane_b_row(lane), ptx::lane_b_chunk(lane)),
        bt(ptx::lane_bt_row(lane), ptx::lane_bt_chunk(lane)) {}
};

// ---- Plain tiles ------------------------------------------------------------------------
// Note [Fused plain tiles]: most column tiles hold no column a warp's rows
// must treat apart: no self, no positive, no column past the end. There the
// epilogue is one FFMA and one ex2 per logit and anchor term, with no index
// arithmetic; the rest take the general path. The warp decides together (one
// vote: row and column ranges, and the labels' low words compared, a superset
// of the matches), so the choice costs no divergence. Invariant: a plain tile
// gives the general path's result (a planted bug, kPlainTilesAddNothing, must
// fail tests/test_fused_grad.py). Measured (SASS, sm_90, bf16, D = 128): the
// statistics pass went from 1705 instructions per warp and tile to 448 for
// its 64 HMMA.

// A tile's 64 column labels live in a 512-byte shared buffer. Threads 0-63 each
// fetch one (0 past `total`) from global memory a tile ahead, into a register,
// and store it after the tile's products: plain loads, as the labels of a
// range of anchors need not be 16-byte aligned for cp.async.
constexpr size_t kFusedLabelBytes = kFusedCols * sizeof(int64_t);
__device__ __forceinline__ int64_t fetch_label(const int64_t* labels, int64_t total, int64_t first) {
  const int64_t at = first + threadIdx.x;
  return labels != nullptr && threadIdx.x < kFusedCols && at < total ? labels[at] : 0;
}
__device__ __forceinline__ void store_label(unsigned char* tile_labels, int64_t label) {
  if (threadIdx.x < kFusedCols) memcpy(tile_labels + threadIdx.x * sizeof(int64_t), &label, sizeof(label));
}

// The staged label of this thread's column 8 n + acc_col(lane, j) of the tile.
__device__ __forceinline__ int64_t staged_label(const unsigned char* tile_labels, int n, int j, int lane) {
  int64_t v;
  memcpy(&v, tile_labels + (8 * n + ptx::acc_col(lane, j)) * sizeof(int64_t), sizeof(v));
  return v;
}

// Whether a column of this thread's 16 may share a label with one of its two
// rows, whose labels' low 32 bits are label_low: the low words compared (a
// superset of the matches, 32 compares).
__device__ __forceinline__ bool labels_may_match(const unsigned char* tile_labels, const uint32_t (&label_low)[2],
                                                 int lane) {
  const uint32_t r0 = label_low[0], r1 = label_low[1];
  bool hit = false;
  for (int n = 0; n < 8; ++n) {
    for (int j = 0; j < 2; ++j) {
      const uint32_t c = uint32_t(staged_label(tile_labels, n, j, lane));
      hit |= (c == r0) | (c == r1);
    }
  }
  return hit;
}

// Whether the half-open index ranges [a, a + a_len) and [b, b + b_len) meet.
__device__ __forceinline__ bool ranges_meet(int64_t a, int64_t a_len, int64_t b, int64_t b_len) {
  return a < b + b_len && b < a + a_len;
}

// An element of the rows as fp32.
__device__ __forceinline__ float element_to_float(float v) { return v; }
__device__ __forceinline__ float element_to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float element_to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

// Whether a warp's column tile is plain, voted by the whole warp: no edge
// (edge: the tile or the warp's 16 rows run past the end), no self where it is
// excluded, no offset positive of a row anchor (kRowAnchors: column = row +
// offset) or of a column anchor (kColumnAnchors: row = column + offset), and
// no shared label. col_first and warp_row0 are global indices.
template <bool kRowAnchors, bool kColumnAnchors>
__device__ __forceinline__ bool tile_is_plain(bool edge, int64_t col_first, int64_t warp_row0, bool exclude_self,
                                              bool offset_positive, int64_t offset, bool labels,
                                              const unsigned char* tile_labels, const uint32_t (&label_low)[2],
                                              int lane) {
  bool special = edge || (exclude_self && ranges_meet(col_first, kFusedCols, warp_row0, 16));
  if (offset_positive) {
    if (kRowAnchors) special |= ranges_meet(col_first, kFusedCols, warp_row0 + offset, 16);
    if (kColumnAnchors) special |= ranges_meet(warp_row0, 16, col_first + offset, kFusedCols);
  }
  if (labels && !special) special = labels_may_match(tile_labels, label_low, lane);
  return !__any_sync(0xffffffffu, special);
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
                                            const unsigned char* tile_k, const FusedLaneRows<kChunks>& rows) {
#pragma unroll
  for (int step = 0; step < kChunks / 2; ++step) {
    uint32_t fa[4];
    ptx::ldmatrix_x4(fa, tile_q + rows.a.step(step));
    if constexpr (std::is_same_v<T, float>) round_to_tf32(fa);
#pragma unroll
    for (int pair = 0; pair < 4; ++pair) {
      uint32_t fb[4];
      ptx::ldmatrix_x4(fb, tile_k + rows.b.step(step, pair));
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
                                                  const float (&p)[8][4], const unsigned char* tile_v,
                                                  const FusedLaneRows<kChunks>& rows, int lane) {
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
#pragma unroll
    for (int step = 0; step < 4; ++step) {
      const uint32_t pa[4] = {ptx::pack2<T>(p[2 * step][0], p[2 * step][1]),
                              ptx::pack2<T>(p[2 * step][2], p[2 * step][3]),
                              ptx::pack2<T>(p[2 * step + 1][0], p[2 * step + 1][1]),
                              ptx::pack2<T>(p[2 * step + 1][2], p[2 * step + 1][3])};
#pragma unroll
      for (int pair = 0; pair < kChunks / 2; ++pair) {
        uint32_t fv[4];
        ptx::ldmatrix_x4<true>(fv, tile_v + rows.bt.step(pair, step));  // rows 16 step.., chunks 2 pair..
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
