#pragma once
// The fused route's statistics pass (Note [Fused statistics pass]): the
// partials of gemm_row_stats_kernel (contrastive_gemm_rows.cuh), per block of
// 64 anchor rows and column split,
//   shift = |scale|, sum_c exp(scale S_rc - shift) over the candidates (self
//   excluded; positives too in the excluded form), the positives' logit sum,
//   count and (log-sum-exp form) sum of exps,
// with S_rc = q_hat_r . k_hat_c formed tile by tile on tensor cores and never
// stored. gemm_row_merge_kernel then merges the splits as on the GEMM route.
//
// Note [Fused statistics pass]:
// - bf16/fp16 rows of up to 256 features and fp32 rows (as TF32) of up to 128:
//   whole 16-byte chunks, at most 512 bytes a row; the logit bound usable
//   (unit rows), sm_80+; everything else keeps the GEMM route's statistics
//   (route choice: choose_contrastive_route in contrastive_passes.cu).
// - CTA: 4 warps, 64 anchor rows (16 per warp, one m16 tile), column tiles of
//   64 double-buffered by cp.async; Q and K tiles swizzled (tensor_core_ptx.cuh).
//   Shared memory: 3 tiles of 64 rows (8, 16 or 32 KB each by the row's
//   chunks) and two 512-byte label tiles.
// - Per logit one FFMA and one ex2 (scale log2(e) folded in), no max: the
//   fixed shift lets partial sums add. Plain tiles (Note [Fused plain tiles])
//   do nothing else; the rest test self, positives and edges per logit.
// - Each thread keeps the statistics of its two rows (g, g + 8) and reduces
//   them over its quad once, at the end. No float atomics: deterministic.
// - Resources and counts per variant: Note [Fused route counts] (contrastive_fused.cuh).
//
// Note [Fused query gradient]: with kQueryGrad the same pass also forms
//   grad_r = 2^14 sum_c exp(scale S_rc - shift) k_hat_c
// (FlashAttention-2's P V with V = K: P from the accumulators as A operands,
// the K tile read again, transposed), per split; the host sums the splits and
// finishes d q_hat_r = scale w_r (grad_r exp(shift - lse_r) - k_hat_{positive(r)}
// / |P(r)|). It serves InfoNCE with only the query asking for a gradient
// (MoCo's detached queue, MoCo v3's detached keys): two products of the pairs
// in all, where the GEMM route takes two GEMMs plus S_c's and G_c's round trip
// (16 bytes per pair).
#include <cstdint>
#include <type_traits>

#include "compat.cuh"
#include "contrastive_fused_tiles.cuh"

namespace ssl_ops::cuda {

template <typename T>
struct FusedStatsParams {
  const T* q;                 // anchors, rows x d (16-byte aligned rows)
  const T* k;                 // candidates, cols x d
  int64_t rows, cols, d, cols_per_split;  // cols_per_split: a multiple of kFusedCols
  int64_t first_row;          // global index of anchor 0 (labels, self, offset positive)
  float scale;
  const int64_t* labels;      // symmetric: labels of all columns; null otherwise
  bool exclude_self, offset_positive, exclude_positives;
  int64_t positive_offset;
  float* part_shift;          // [split][row], as gemm_row_stats_kernel's
  float* part_sum;
  float* part_positive;
  int64_t* part_count;
  float* part_pos_shift;      // log-sum-exp form only, else null
  float* part_pos_sum;
  // Query gradient (kQueryGrad): 2^14 sum_c exp(scale S_rc - shift) k_hat_c over the
  // candidates, [split][row][d] (Note [Fused query gradient]).
  float* part_grad;
};

template <int kChunks>
constexpr size_t fused_stats_smem_bytes() {
  return 3 * fused_tile_bytes<kChunks>() + 2 * kFusedLabelBytes;
}

// The CTAs per multiprocessor the launch bounds ask ptxas to fit: as many as
// shared memory holds, at most 4 (bf16/fp16) or 2 (TF32, whose operands take a
// conversion each), and with the query gradient's D / 2 accumulators per
// thread 2 (D <= 128) or 1. Without a bound ptxas chose 128 registers for a
// TF32 variant and spilled; at 3 (170 registers) it spilled 32 bytes.
template <typename T, int kChunks, bool kQueryGrad>
constexpr int fused_stats_min_ctas() {
  constexpr int kBySmem = int((228 * 1024) / (fused_stats_smem_bytes<kChunks>() + 1024));
  constexpr int kMost = std::is_same_v<T, float> ? 2 : 4;
  constexpr int kByShared = kBySmem < kMost ? kBySmem : kMost;
  return kQueryGrad ? (kChunks <= 16 && kByShared >= 2 ? 2 : 1) : kByShared;
}

template <typename T, int kChunks, bool kQueryGrad>
__global__ void __launch_bounds__(kFusedThreads, (fused_stats_min_ctas<T, kChunks, kQueryGrad>()))
    fused_row_stats_kernel(FusedStatsParams<T> p) {
  SSL_DYNAMIC_SMEM(unsigned char, smem);
  constexpr int kTileBytes = kFusedRows * kChunks * 16;
  unsigned char* tile_q = smem;
  unsigned char* label_tiles = smem + 3 * kTileBytes;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const RowStager<T, kChunks> stager;
  const FusedLaneRows<kChunks> lane_rows(warp, lane);
  const int64_t row0 = int64_t(blockIdx.x) * kFusedRows;
  const int64_t c0 = int64_t(blockIdx.y) * p.cols_per_split;
  const int64_t c1 = c0 + p.cols_per_split < p.cols ? c0 + p.cols_per_split : p.cols;
  stager.stage(tile_q, p.q, p.rows, row0, p.d);
  stager.stage(smem + kTileBytes, p.k, p.cols, c0, p.d);
  ptx::cp_async_commit();
  store_label(label_tiles, fetch_label(p.labels, p.cols, c0));

  const float bound = p.scale < 0 ? -p.scale : p.scale;
  constexpr float kLog2e = 1.4426950408889634f;
  const float scale_log2 = p.scale * kLog2e, shift_log2 = bound * kLog2e;
  // The warp's 16 rows: global indices warp_row0 .. + 15, all of them rows of the matrix or not.
  const int64_t warp_row0 = p.first_row + row0 + 16 * warp;
  const bool warp_rows_full = row0 + 16 * warp + 16 <= p.rows;
  // The labels' low words of this thread's two rows stay in registers for the
  // plain tiles; the general path reloads the rest.
  uint32_t label_low[2] = {};
  for (int h = 0; h < 2; ++h) {
    const int64_t row = row0 + 16 * warp + ptx::acc_row(lane, 2 * h);
    if (p.labels && row < p.rows) label_low[h] = uint32_t(p.labels[p.first_row + row]);
  }
  float sum[2] = {}, positive[2] = {}, pos_sum[2] = {};
  int count[2] = {};
  constexpr int kFeatureTiles = fused_feature_tiles<T, kChunks>();
  float grad[kQueryGrad ? kFeatureTiles : 1][4] = {};  // n8 tiles of the d features

  int buffer = 0;
  for (int64_t t0 = c0; t0 < c1; t0 += kFusedCols, buffer ^= 1) {
    ptx::cp_async_wait<0>();
    __syncthreads();  // tile t0 and its labels are in; every warp is done with the other buffers
    if (t0 + kFusedCols < c1) stager.stage(smem + (2 - buffer) * kTileBytes, p.k, p.cols, t0 + kFusedCols, p.d);
    ptx::cp_async_commit();
    const int64_t next_label = t0 + kFusedCols < c1 ? fetch_label(p.labels, p.cols, t0 + kFusedCols) : 0;
    const unsigned char* tile_k = smem + (1 + buffer) * kTileBytes;
    const unsigned char* tile_labels = label_tiles + buffer * kFusedLabelBytes;

    // A plain tile (Note [Fused plain tiles]): every column a candidate of
    // every row of the warp and no positive among them.
    const bool plain = tile_is_plain<true, false>(!warp_rows_full || t0 + kFusedCols > c1, t0, warp_row0,
                                                  p.exclude_self, p.offset_positive, p.positive_offset,
                                                  p.labels != nullptr, tile_labels, label_low, lane);
    float acc[8][4] = {};
    tile_logits<T, kChunks>(acc, tile_q, tile_k, lane_rows);
    if (plain) {
#pragma unroll
      for (int n = 0; n < 8; ++n) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          float e = ptx::exp2_ftz(fmaf(acc[n][i], scale_log2, -shift_log2));
          if (SSL_OPS_PLANTED(kPlainTilesAddNothing)) e = 0.0f;
          sum[i >> 1] += e;
          if constexpr (kQueryGrad) acc[n][i] = e * kFusedPScale;
        }
      }
    } else {
      int64_t global_row[2], label[2];
      bool live[2];
      for (int h = 0; h < 2; ++h) {
        const int64_t row = row0 + 16 * warp + ptx::acc_row(lane, 2 * h);
        live[h] = row < p.rows;
        global_row[h] = p.first_row + row;
        label[h] = p.labels && live[h] ? p.labels[global_row[h]] : 0;
      }
      // Which of this thread's 16 columns share a label with each of its two
      // rows (bit 2 (2 n + j) + h).
      uint32_t same_label = 0;
      if (p.labels) {
        for (int n = 0; n < 8; ++n) {
          for (int j = 0; j < 2; ++j) {
            const int64_t label_c = staged_label(tile_labels, n, j, lane);
            for (int h = 0; h < 2; ++h) same_label |= uint32_t(label_c == label[h]) << (2 * (2 * n + j) + h);
          }
        }
      }
      for (int n = 0; n < 8; ++n) {
        for (int i = 0; i < 4; ++i) {
          const int h = i >> 1;
          const int64_t col = t0 + 8 * n + ptx::acc_col(lane, i);
          // P for the query gradient: exp(logit - shift) at the candidates, 0 elsewhere.
          if (!live[h] || col >= c1 || (p.exclude_self && col == global_row[h])) {
            if constexpr (kQueryGrad) acc[n][i] = 0.0f;
            continue;
          }
          bool is_positive = false;
          if (p.labels) is_positive = (same_label >> (2 * (2 * n + (i & 1)) + h)) & 1u;
          if (p.offset_positive) is_positive = col == global_row[h] + p.positive_offset;
          const float e = ptx::exp2_ftz(fmaf(acc[n][i], scale_log2, -shift_log2));
          if (!(p.exclude_positives && is_positive)) sum[h] += e;
          if (is_positive) {
            positive[h] += p.scale * acc[n][i];
            ++count[h];
            pos_sum[h] += e;
          }
          if constexpr (kQueryGrad) acc[n][i] = e * kFusedPScale;
        }
      }
    }
    if constexpr (kQueryGrad) {
      tile_times_values<T, kChunks>(grad, acc, tile_k, lane_rows, lane);  // grad += P K over this tile
    }
    store_label(label_tiles + (buffer ^ 1) * kFusedLabelBytes, next_label);
  }
  ptx::cp_async_wait<0>();  // nothing may be in flight when the block ends

  // The four lanes of a quad share rows g and g + 8.
  for (int h = 0; h < 2; ++h) {
    for (int offset = 1; offset < 4; offset *= 2) {
      sum[h] += __shfl_xor_sync(0xffffffffu, sum[h], offset);
      positive[h] += __shfl_xor_sync(0xffffffffu, positive[h], offset);
      pos_sum[h] += __shfl_xor_sync(0xffffffffu, pos_sum[h], offset);
      count[h] += __shfl_xor_sync(0xffffffffu, count[h], offset);
    }
    const int64_t row = row0 + 16 * warp + ptx::acc_row(lane, 2 * h);
    if ((lane & 3) == 0 && row < p.rows) {
      const int64_t at = int64_t(blockIdx.y) * p.rows + row;
      p.part_shift[at] = bound;
      p.part_sum[at] = sum[h];
      p.part_positive[at] = positive[h];
      p.part_count[at] = count[h];
      if (p.part_pos_sum) {
        p.part_pos_shift[at] = bound;
        p.part_pos_sum[at] = pos_sum[h];
      }
    }
  }
  if constexpr (kQueryGrad) {
    store_row_block<kFeatureTiles>(p.part_grad + int64_t(blockIdx.y) * p.rows * p.d, grad, row0, p.rows, p.d, warp, lane);
  }
}

// Note [Fused query gradient]'s finish, one launch: for each anchor r and
// feature f (four per thread; d a multiple of 4),
//   d q_hat_rf = w_r scale' (exp(shift - lse_r) / 2^14 sum_splits grad_rf
//                 - k_hat_{r + offset, f} / |P(r)|   (offset positive only))
// with scale' = product_scale kGScale (= scale max|w|), the splits summed in
// order (no atomics).
template <typename T>
struct FusedQueryGradParams {
  const float* part_grad;     // [splits][rows][d]
  int64_t splits, rows, d;
  const float* lse;           // rows
  const float* weight;        // w_r / max|w| (0 where the row adds nothing)
  const float* inv_count;     // 1 / |P(r)|
  const float* product_scale; // 0-dim: scale max|w| / kGScale
  float g_scale;              // kGScale
  float shift;                // |scale|
  const T* keys;              // offset positive: key rows (cols x d), else null
  int64_t positive0, cols;    // the positive of anchor r: key positive0 + r (clamped to the keys)
  float* out;                 // rows x d
};

constexpr int kQueryGradThreads = 256;
template <typename T>
__global__ void __launch_bounds__(kQueryGradThreads) fused_query_grad_kernel(FusedQueryGradParams<T> p) {
  const int64_t i = (int64_t(blockIdx.x) * kQueryGradThreads + threadIdx.x) * 4;
  if (i >= p.rows * p.d) return;
  const int64_t r = i / p.d, f = i % p.d;
  const int64_t n = p.rows * p.d;
  Vec<float, 4> g = *reinterpret_cast<const Vec<float, 4>*>(p.part_grad + i);
  for (int64_t s = 1; s < p.splits; ++s) {
    const Vec<float, 4> part = *reinterpret_cast<const Vec<float, 4>*>(p.part_grad + s * n + i);
    for (int j = 0; j < 4; ++j) g.val[j] += part.val[j];
  }
  const float softmax = expf(p.shift - p.lse[r]) / kFusedPScale;
  const float factor = p.weight[r] * (*p.product_scale * p.g_scale);
  int64_t positive = p.positive0 + r;
  positive = positive < 0 ? 0 : positive >= p.cols ? p.cols - 1 : positive;
  for (int j = 0; j < 4; ++j) {
    float v = g.val[j] * softmax;
    if (p.keys) v -= element_to_float(p.keys[positive * p.d + f + j]) * p.inv_count[r];
    g.val[j] = v * factor;
  }
  store16(p.out + i, g);
}

}  // namespace ssl_ops::cuda
