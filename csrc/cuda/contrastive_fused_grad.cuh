#pragma once
// The fused route's gradient pass (Note [Fused gradient pass]): from the merged
// statistics of each anchor r (lse_r, weight w_r, 1 / |P(r)|, lse_pos_r) it
// recomputes S tile by tile on tensor cores and forms, in registers,
//   G_rc = kGScale w_r (exp(scale S_rc - lse_r) - positive_rc / |P(r)|)
//   (positive_rc exp(scale S_rc - lse_pos_r) in the log-sum-exp form with more
//   than one positive; 0 at self and, in the excluded form, at the positives)
// exactly as gemm_row_coef_kernel writes G_c (contrastive_gemm_rows.cuh),
// rounded to the input dtype as the A operand of a second mma against the
// column tile (FlashAttention-2's P V). One kernel, three orientations:
//   kRows     CTA rows = anchors,    columns = candidates:  d q_hat = G k_hat
//   kColumns  CTA rows = candidates, columns = anchors:     d k_hat = G^T q_hat
//   kBoth     every row an anchor of the same matrix (the symmetric op, Q = K = z_hat):
//             d z_hat = (G + G^T) z_hat, both terms of each pair from one S
// Outputs are fp32 partials [split][row][d]; the host sums the splits in a
// fixed order and multiplies by scale max|w| / kGScale. No float atomics.
//
// Note [Fused gradient pass]:
// - Where it applies: the statistics pass's conditions (choose_contrastive_route in
//   contrastive_passes.cu), with the statistics computed or given (backward op).
// - Per anchor the host packs {lse_r log2(e), kGScale w_r, inv_r, lse_pos_r log2(e)}
//   into 16 bytes (inv_r = -1: the log-sum-exp term; lse 0 where w_r = 0, so a
//   plain tile's w exp2(s - lse) is 0, never 0 x inf); kColumns and kBoth
//   stage the column anchors' records by cp.async next to their tile (1 KB).
// - Shared memory: the rows tile, two column tiles, two record tiles and two
//   label tiles (Note [Fused route counts]).
// - Per logit: one FFMA and one ex2 per anchor term (kBoth: two), the
//   coefficient rounded to the input dtype as an A operand; plain tiles (Note
//   [Fused plain tiles]) skip every index test.
// - NT-Xent (kBoth) takes two products of the pairs for the whole gradient,
//   where kRows + kColumns take four and the GEMM route four plus G_c's and
//   S_c's round trip (16 bytes per pair).
#include <cstdint>

#include "compat.cuh"
#include "contrastive_fused_tiles.cuh"

namespace ssl_ops::cuda {

enum class FusedGradMode { kRows, kColumns, kBoth };

// One anchor's statistics for the gradient (16 bytes: one cp.async), as the
// statistics merge writes them (GemmMergeParams::anchor_terms) or the host
// packs them from given statistics (the backward op).
struct alignas(16) FusedAnchorTerms {
  float lse_log2;      // lse_r log2(e); 0 where gw = 0
  float gw;            // kGScale w_r (|w_r| <= 1, normalised by the host); 0: the row adds nothing
  float inv;           // 1 / |P(r)|; -1: the positives' term is exp(s - lse_pos_r)
  float lse_pos_log2;  // lse_pos_r log2(e) (log-sum-exp form), else 0
};
static_assert(sizeof(FusedAnchorTerms) == 4 * sizeof(float), "the merge kernel writes 4 floats a row");

template <typename T>
struct FusedGradParams {
  const T* rows_in;       // the CTA's rows (kRows, kBoth: anchors; kColumns: candidates), rows x d
  const T* cols_in;       // the column tiles and values (kRows: candidates; kColumns: anchors; kBoth: = rows_in)
  int64_t rows, cols, d, cols_per_split;  // cols_per_split: a multiple of kFusedCols
  int64_t first_row;      // global index of anchor 0 (labels, self, offset positive)
  float scale_log2;       // scale log2(e)
  const FusedAnchorTerms* terms;  // per anchor (local index)
  const int64_t* labels;  // by global index (anchor first_row + a, candidate c); null: no labels
  bool exclude_self, offset_positive, exclude_positives;
  int64_t positive_offset;
  float* out;             // [split][rows][d]
};

template <int kChunks, FusedGradMode kMode>
constexpr size_t fused_grad_smem_bytes() {
  return 3 * fused_tile_bytes<kChunks>() +
      (kMode == FusedGradMode::kRows ? 0 : 2 * kFusedCols * sizeof(FusedAnchorTerms)) + 2 * kFusedLabelBytes;
}

// G for anchor terms t and a candidate with logit s_log2 (log2 units).
__device__ __forceinline__ float fused_coefficient(float s_log2, const FusedAnchorTerms& t, bool positive,
                                                   bool exclude_positives) {
  if (t.gw == 0.0f || (positive && exclude_positives)) return 0.0f;
  float positive_term = 0.0f;
  if (positive) positive_term = t.inv >= 0.0f ? t.inv : ptx::exp2_ftz(s_log2 - t.lse_pos_log2);
  return t.gw * (ptx::exp2_ftz(s_log2 - t.lse_log2) - positive_term);
}

template <typename T, int kChunks, FusedGradMode kMode>
__global__ void __launch_bounds__(kFusedThreads) fused_grad_kernel(FusedGradParams<T> p) {
  constexpr bool kRowAnchors = kMode != FusedGradMode::kColumns;
  constexpr bool kColumnAnchors = kMode != FusedGradMode::kRows;
  constexpr size_t kTileBytes = fused_tile_bytes<kChunks>();
  constexpr int kTermsBytes = kFusedCols * int(sizeof(FusedAnchorTerms));
  SSL_DYNAMIC_SMEM(unsigned char, smem);
  unsigned char* tile_q = smem;
  unsigned char* terms_tiles = smem + 3 * kTileBytes;
  unsigned char* label_tiles = terms_tiles + (kColumnAnchors ? 2 * kTermsBytes : 0);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const RowStager<T, kChunks> stager;
  const FusedLaneRows<kChunks> lane_rows(warp, lane);
  const int64_t row0 = int64_t(blockIdx.x) * kFusedRows;
  const int64_t c0 = int64_t(blockIdx.y) * p.cols_per_split;
  const int64_t c1 = c0 + p.cols_per_split < p.cols ? c0 + p.cols_per_split : p.cols;
  // The column anchors' records of tile t0 into record buffer b (past the end: zeros, gw = 0).
  const auto stage_terms = [&](int b, int64_t t0) {
    if (threadIdx.x < kFusedCols) {
      const bool inside = t0 + threadIdx.x < p.cols;
      ptx::cp_async_16(terms_tiles + b * kTermsBytes + threadIdx.x * sizeof(FusedAnchorTerms),
                       inside ? p.terms + t0 + threadIdx.x : p.terms, inside ? 16 : 0);
    }
  };
  stager.stage(tile_q, p.rows_in, p.rows, row0, p.d);
  stager.stage(smem + kTileBytes, p.cols_in, p.cols, c0, p.d);
  if constexpr (kColumnAnchors) stage_terms(0, c0);
  ptx::cp_async_commit();

  // Global indices: anchors first_row + local index (labels, self, offsets).
  const int64_t row_global0 = kRowAnchors ? p.first_row : 0;
  const int64_t col_global0 = kColumnAnchors && kMode != FusedGradMode::kBoth ? p.first_row : 0;
  const int64_t* column_labels = p.labels ? p.labels + col_global0 : nullptr;  // by local column index
  store_label(label_tiles, fetch_label(column_labels, p.cols, c0));
  // The warp's 16 rows: global indices warp_row0 .. + 15, all of them rows of the matrix or not.
  const int64_t warp_row0 = row_global0 + row0 + 16 * warp;
  const bool warp_rows_full = row0 + 16 * warp + 16 <= p.rows;
  // What the plain tiles need of this thread's two rows stays in registers
  // (lse, weight, the labels' low words); the general path reloads the rest.
  float row_lse_log2[2] = {}, row_gw[2] = {};
  uint32_t label_low[2] = {};
  for (int h = 0; h < 2; ++h) {
    const int64_t row = row0 + 16 * warp + ptx::acc_row(lane, 2 * h);
    if (row < p.rows) {
      if (p.labels) label_low[h] = uint32_t(p.labels[row_global0 + row]);
      if constexpr (kRowAnchors) {
        row_lse_log2[h] = p.terms[row].lse_log2;
        row_gw[h] = p.terms[row].gw;
      }
    }
  }
  constexpr int kFeatureTiles = fused_feature_tiles<T, kChunks>();
  float grad[kFeatureTiles][4] = {};

  int buffer = 0;
  for (int64_t t0 = c0; t0 < c1; t0 += kFusedCols, buffer ^= 1) {
    ptx::cp_async_wait<0>();
    __syncthreads();  // tile t0 is in; every warp is done with the other buffer
    if (t0 + kFusedCols < c1) {
      stager.stage(smem + (2 - buffer) * kTileBytes, p.cols_in, p.cols, t0 + kFusedCols, p.d);
      if constexpr (kColumnAnchors) stage_terms(buffer ^ 1, t0 + kFusedCols);
    }
    ptx::cp_async_commit();
    const int64_t next_label = t0 + kFusedCols < c1 ? fetch_label(column_labels, p.cols, t0 + kFusedCols) : 0;
    const unsigned char* tile_k = smem + (1 + buffer) * kTileBytes;
    const auto* column_terms = reinterpret_cast<const FusedAnchorTerms*>(terms_tiles + buffer * kTermsBytes);
    const unsigned char* tile_labels = label_tiles + buffer * kFusedLabelBytes;

    // A plain tile (Note [Fused plain tiles]): every column a candidate of
    // every row of the warp and the other way round, and no positive among them.
    const bool plain = tile_is_plain<kRowAnchors, kColumnAnchors>(
        !warp_rows_full || t0 + kFusedCols > c1, col_global0 + t0, warp_row0, p.exclude_self, p.offset_positive,
        p.positive_offset, p.labels != nullptr, tile_labels, label_low, lane);
    float acc[8][4] = {};
    tile_logits<T, kChunks>(acc, tile_q, tile_k, lane_rows);
    if (plain) {
      // G = w_r exp(s - lse_r) (+ w_c exp(s - lse_c)): a row without weight has
      // gw = 0 and a finite lse_log2 (fused_anchor_terms), so its term is 0.
#pragma unroll
      for (int n = 0; n < 8; ++n) {
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          FusedAnchorTerms column = {};
          if constexpr (kColumnAnchors) column = column_terms[8 * n + ptx::acc_col(lane, j)];
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            float& a = acc[n][2 * h + j];
            float coef = 0.0f;
            if constexpr (kRowAnchors) coef = row_gw[h] * ptx::exp2_ftz(fmaf(a, p.scale_log2, -row_lse_log2[h]));
            if (kColumnAnchors && !SSL_OPS_PLANTED(kDropTransposedTerm)) {
              coef = fmaf(column.gw, ptx::exp2_ftz(fmaf(a, p.scale_log2, -column.lse_log2)), coef);
            }
            a = SSL_OPS_PLANTED(kPlainTilesAddNothing) ? 0.0f : coef;
          }
        }
      }
    } else {
      int64_t row_global[2], label[2];
      bool live[2];
      FusedAnchorTerms row_terms[2] = {};
      for (int h = 0; h < 2; ++h) {
        const int64_t row = row0 + 16 * warp + ptx::acc_row(lane, 2 * h);
        live[h] = row < p.rows;
        row_global[h] = row_global0 + row;
        label[h] = p.labels && live[h] ? p.labels[row_global[h]] : 0;
        if constexpr (kRowAnchors) {
          if (live[h]) row_terms[h] = p.terms[row];
        }
      }
      // Label equality of this thread's 16 columns with its two rows (bit 2 (2 n + j) + h).
      uint32_t same_label = 0;
      if (p.labels) {
        for (int n = 0; n < 8; ++n) {
          for (int j = 0; j < 2; ++j) {
            const int64_t label_c = staged_label(tile_labels, n, j, lane);
            for (int h = 0; h < 2; ++h) same_label |= uint32_t(label_c == label[h]) << (2 * (2 * n + j) + h);
          }
        }
      }
#pragma unroll  // acc must stay in registers: indexed by constants only
      for (int n = 0; n < 8; ++n) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int h = i >> 1;
          const int64_t col = t0 + 8 * n + ptx::acc_col(lane, i);
          const int64_t col_global = col_global0 + col;
          const float s_log2 = acc[n][i] * p.scale_log2;
          float coef = 0.0f;
          if (live[h] && col < c1 && !(p.exclude_self && col_global == row_global[h])) {
            const bool same = p.labels && ((same_label >> (2 * (2 * n + (i & 1)) + h)) & 1u);
            if constexpr (kRowAnchors) {  // anchor = row, candidate = column
              const bool positive = p.offset_positive ? col_global == row_global[h] + p.positive_offset : same;
              coef += fused_coefficient(s_log2, row_terms[h], positive, p.exclude_positives);
            }
            if (kColumnAnchors && !SSL_OPS_PLANTED(kDropTransposedTerm)) {  // anchor = column, candidate = row
              const bool positive = p.offset_positive ? row_global[h] == col_global + p.positive_offset : same;
              coef += fused_coefficient(s_log2, column_terms[col - t0], positive, p.exclude_positives);
            }
          }
          acc[n][i] = coef;
        }
      }
    }
    tile_times_values<T, kChunks>(grad, acc, tile_k, lane_rows, lane);
    store_label(label_tiles + (buffer ^ 1) * kFusedLabelBytes, next_label);
  }
  ptx::cp_async_wait<0>();  // nothing may be in flight when the block ends
  store_row_block<kFeatureTiles>(p.out + int64_t(blockIdx.y) * p.rows * p.d, grad, row0, p.rows, p.d, warp, lane);
}

// The gradient passes' split partials merged: out = scale * sum over the
// splits of parts[split], in split order (no atomics); n a multiple of 4
// (rows of whole 16-byte chunks), four floats per thread.
// (A template, float only, so that each translation unit including this header may hold it.)
constexpr int kSumSplitsThreads = 256;
template <typename A>
__global__ void __launch_bounds__(kSumSplitsThreads)
    fused_sum_splits_kernel(const A* parts, int64_t splits, int64_t n, const A* scale, A* out) {
  const int64_t i = (int64_t(blockIdx.x) * kSumSplitsThreads + threadIdx.x) * 4;
  if (i >= n) return;
  Vec<A, 4> total = *reinterpret_cast<const Vec<A, 4>*>(parts + i);
  for (int64_t s = 1; s < splits; ++s) {
    const Vec<A, 4> part = *reinterpret_cast<const Vec<A, 4>*>(parts + s * n + i);
    for (int j = 0; j < 4; ++j) total.val[j] += part.val[j];
  }
  const A factor = *scale;
  for (int j = 0; j < 4; ++j) total.val[j] *= factor;
  store16(out + i, total);
}

}  // namespace ssl_ops::cuda
