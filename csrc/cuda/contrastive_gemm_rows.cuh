#pragma once
// Row kernels of the GEMM route (host code: contrastive_gemm.cu). The vendor
// GEMM has written one chunk of the similarity matrix,
//   S_rc = q_hat_r . k_hat_c        (c anchor rows x all n candidate columns, fp32; fp64 for double)
// and these kernels read it once per pass:
//
// gemm_row_stats_kernel: block (row, column split) walks its columns, logit
//   s = scale * S_rc, and keeps, per row and split: the shift (the logit bound
//   |scale| where usable, else the largest logit), sum exp(s - shift) over the
//   candidates (self excluded), and the sum and count of positive logits
//   (equal labels; or the column r + positive_offset). With the bounded shift
//   the partial sums of the splits simply add. With the positives inside the
//   log (part_pos_sum given), also their sum of exps: the same exps under the
//   bounded shift, else shifted by the positives' own largest logit (one exp
//   more per positive), so a positive far below the row's largest logit
//   keeps its weight. With the positives excluded (DCL's negatives), they are
//   counted but left out of the sum and the max.
// gemm_row_merge_kernel: one thread per row merges the splits (and MoCo's
//   positive-key logit, the first term of each row) into lse_r, the positive
//   sum and count, and the row's gradient weight w_r and 1 / |P(r)|; with the
//   positives inside the log, lse_pos_r (the logit itself for one positive) and
//   inv = 1 for one positive, 0 for more (their term is exp(s - lse_pos_r)).
// gemm_row_coef_kernel: block (row, column split) writes
//   G_rc = kGScale * w_r * (exp(s - lse_r) - positive_rc / |P(r)|)   (0 at self)
//   (positive_rc exp(s - lse_pos_r) where inv is 0 in the log-sum-exp form)
//   in the input dtype, over S (fp32/fp64 inputs: same element, same thread)
//   or into its own buffer (fp16/bf16: half the bytes for the gradient GEMMs).
//   The host passes w normalised to max |w| = 1 and multiplies the fp32
//   products by scale * max |w| / kGScale: |G| <= 2^14 stays inside fp16's
//   range, and a softmax of 1e-8 (65536 candidates) is still a normal fp16
//   number instead of underflowing, as w = 1/N and scale would make it.
//
// Resources (ptxas -v, sm_90, nvcc 13.0; 256 threads; 2026-11-28): stats 40
// registers (fp64 52), 96-128 bytes shared memory; merge 32; coef 29-32; no
// spills, so 8 blocks per SM fit.
//
// Counts per element (fp32 S, bf16 G): stats reads 4 bytes and takes one exp
// (bounded shift) or two passes (running max); coef reads 4, writes 2 and
// takes one exp. Blocks: rows x splits, splits chosen so the grid has about
// two waves of the multiprocessors (host code).
#include <cstdint>

#include "compat.cuh"
#include "acc_type.cuh"
#include "block_reduce.cuh"

namespace ssl_ops::cuda {

constexpr int kGemmRowThreads = kBlockReduceThreads;
constexpr double kGScale = 16384.0;  // 2^14: exact in every dtype

template <typename A>
struct GemmRowParams {
  const A* s;              // rows x cols, row-major
  int64_t rows, cols, cols_per_split;
  int64_t first_row;       // global index of the chunk's row 0 (labels, self, offset positive)
  A scale;
  bool bounded;            // shift by bound = |scale| (unit rows, contrastive_check.h)
  const int64_t* labels;   // symmetric: labels of all rows (= columns); null otherwise
  bool exclude_self;       // symmetric: column first_row + r is row r itself
  bool offset_positive;    // in-batch InfoNCE: column first_row + r + positive_offset is the positive
  bool exclude_positives;  // symmetric, excluded form: positives are counted but are no candidates
  int64_t positive_offset;
  A* part_shift;           // [split][row]
  A* part_sum;
  A* part_positive;
  int64_t* part_count;
  A* part_pos_shift;       // positives inside the log only, else null
  A* part_pos_sum;
};

template <typename A>
struct RowColumn {
  bool candidate, positive;
};

template <typename A>
__device__ __forceinline__ RowColumn<A> classify(const GemmRowParams<A>& p, int64_t row, int64_t col, int64_t label) {
  const int64_t global_row = p.first_row + row;
  const bool self = p.exclude_self && col == global_row;
  bool positive = false;
  if (!self) {
    if (p.labels) positive = p.labels[col] == label;
    if (p.offset_positive) positive = col == global_row + p.positive_offset;
  }
  return {!self, positive};
}

// 4 blocks of 256 threads per multiprocessor: left to itself, ptxas held the
// fp32 kernel to 32 registers (8 blocks) and spilled 16 bytes.
template <typename A>
__global__ void __launch_bounds__(kGemmRowThreads, 4) gemm_row_stats_kernel(GemmRowParams<A> p) {
  __shared__ A smem[kGemmRowThreads / 32];
  __shared__ int64_t smem_count[kGemmRowThreads / 32];
  const int64_t row = blockIdx.x, split = blockIdx.y;
  const int64_t c0 = split * p.cols_per_split;
  const int64_t c1 = c0 + p.cols_per_split < p.cols ? c0 + p.cols_per_split : p.cols;
  const A* s = p.s + row * p.cols;
  const int64_t label = p.labels ? p.labels[p.first_row + row] : 0;
  const bool pos_lse = p.part_pos_sum != nullptr;
  A shift = p.bounded ? (p.scale < 0 ? -p.scale : p.scale) : negative_infinity<A>();
  A pos_shift = shift;
  if (!p.bounded) {
    A local = negative_infinity<A>(), local_pos = negative_infinity<A>();
    for (int64_t c = c0 + threadIdx.x; c < c1; c += kGemmRowThreads) {
      const RowColumn<A> kind = classify(p, row, c, label);
      if (kind.candidate && !(p.exclude_positives && kind.positive)) {
        const A logit = p.scale * s[c];
        local = logit > local ? logit : local;
      }
      if (kind.positive && p.scale * s[c] > local_pos) local_pos = p.scale * s[c];
    }
    shift = block_reduce(local, smem, true);
    if (pos_lse) pos_shift = block_reduce(local_pos, smem, true);
  }
  A sum = 0, positive = 0, pos_sum = 0;
  int64_t count = 0;
  // shift is -inf where the split has no candidate (excluded form: no
  // negative); its positives are still counted.
  const bool any_candidate = shift != negative_infinity<A>();
  for (int64_t c = c0 + threadIdx.x; c < c1; c += kGemmRowThreads) {
    const RowColumn<A> kind = classify(p, row, c, label);
    if (!kind.candidate) continue;
    const A logit = p.scale * s[c];
    const A e = any_candidate ? device_exp(logit - shift) : A(0);
    if (!(p.exclude_positives && kind.positive)) sum += e;
    if (kind.positive) {
      positive += logit;
      ++count;
      if (pos_lse) pos_sum += p.bounded ? e : device_exp(logit - pos_shift);
    }
  }
  sum = block_reduce(sum, smem, false);
  positive = block_reduce(positive, smem, false);
  if (pos_lse) pos_sum = block_reduce(pos_sum, smem, false);
  // Counts: a warp sum, then the warps' partials through shared memory.
  for (int offset = 16; offset > 0; offset /= 2) count += __shfl_xor_sync(0xffffffffu, count, offset);
  if (threadIdx.x % 32 == 0) smem_count[threadIdx.x / 32] = count;
  __syncthreads();
  if (threadIdx.x == 0) {
    int64_t total = 0;
    for (int w = 0; w < kGemmRowThreads / 32; ++w) total += smem_count[w];
    const int64_t at = split * p.rows + row;
    p.part_shift[at] = shift;
    p.part_sum[at] = sum;
    p.part_positive[at] = positive;
    p.part_count[at] = total;
    if (pos_lse) {
      p.part_pos_shift[at] = pos_shift;
      p.part_pos_sum[at] = pos_sum;
    }
  }
}

template <typename A>
struct GemmMergeParams {
  const A* part_shift;
  const A* part_sum;
  const A* part_positive;
  const int64_t* part_count;
  const A* part_pos_shift;  // positives inside the log only, else null
  const A* part_pos_sum;
  int64_t rows, splits;
  const A* initial_logit;   // MoCo: the positive-key logit of each row (the first term); or null
  const A* weight_in;       // per-row gradient weight (the backward op); null: 1 where the row counts
  bool rows_need_positives; // symmetric: rows without positives add no loss and no gradient
  bool exclude_positives;   // symmetric, excluded form: the loss is lse alone
  A* lse;                   // outputs, chunk rows
  A* positive_sum;
  int64_t* positive_count;
  A* weight;                // w_r, for the coef kernel
  A* inv_count;             // 1 / |P(r)| (0 without positives; log-sum-exp form: 1 for one positive, else 0)
  A* lse_positive;          // log-sum-exp form: lse_pos_r (0 without positives)
  A* row_loss;              // symmetric: loss_r (0 without positives), or null
  // The fused gradient pass's record of each row (FusedAnchorTerms, 4 floats:
  // lse log2(e) (0 where w = 0), kGScale w, 1 / |P| (-1: exp(s - lse_pos)),
  // lse_pos log2(e)), written with w; or null.
  float* anchor_terms;
  // MoCo with a gradient: each row's positive-key coefficient
  // scale w_r (exp(initial_logit_r - lse_r) - 1), written with w; or null.
  A* positive_coef;
  A positive_coef_scale;
};

template <typename A>
__global__ void __launch_bounds__(kGemmRowThreads) gemm_row_merge_kernel(GemmMergeParams<A> p) {
  const int64_t row = int64_t(blockIdx.x) * kGemmRowThreads + threadIdx.x;
  if (row >= p.rows) return;
  A shift = p.initial_logit ? p.initial_logit[row] : negative_infinity<A>();
  for (int64_t k = 0; k < p.splits; ++k) {
    const A part = p.part_shift[k * p.rows + row];
    shift = part > shift ? part : shift;
  }
  A sum = p.initial_logit ? device_exp(p.initial_logit[row] - shift) : A(0);
  A positive = 0;
  int64_t count = 0;
  for (int64_t k = 0; k < p.splits; ++k) {
    const A part = p.part_shift[k * p.rows + row];
    if (part != negative_infinity<A>()) sum += p.part_sum[k * p.rows + row] * device_exp(part - shift);
    positive += p.part_positive[k * p.rows + row];
    count += p.part_count[k * p.rows + row];
  }
  p.lse[row] = shift + log(sum);
  if (p.positive_sum) p.positive_sum[row] = positive;
  if (p.positive_count) p.positive_count[row] = count;
  const bool pos_lse = p.part_pos_sum != nullptr;
  // Note [Loss rounding] (csrc/cpu/contrastive_sym.cpp): the shift and the
  // positive logit subtracted first, then the log, not (shift + log(sum)) -
  // positive, which leaves an ulp of the shift in a small loss.
  if (p.row_loss && (!pos_lse || count <= 1)) {
    const A positive_term = p.exclude_positives ? A(0) : positive / A(count);
    p.row_loss[row] = count > 0 ? (shift - positive_term) + log(sum) : A(0);
  }
  if (pos_lse) {
    A pos_shift = negative_infinity<A>();
    for (int64_t k = 0; k < p.splits; ++k) {
      const A part = p.part_pos_shift[k * p.rows + row];
      pos_shift = part > pos_shift ? part : pos_shift;
    }
    A pos_sum = 0;
    for (int64_t k = 0; k < p.splits; ++k) {
      const A part = p.part_pos_shift[k * p.rows + row];
      if (part != negative_infinity<A>()) pos_sum += p.part_pos_sum[k * p.rows + row] * device_exp(part - pos_shift);
    }
    // One positive: its logit, exactly (the mean form's arithmetic).
    p.lse_positive[row] = count == 1 ? positive : (count > 1 ? pos_shift + log(pos_sum) : A(0));
    if (p.row_loss && count > 1) p.row_loss[row] = (shift - pos_shift) + (log(sum) - log(pos_sum));
  }
  if (p.weight) {
    const bool counts = !p.rows_need_positives || count > 0;
    const A w = counts ? (p.weight_in ? p.weight_in[row] : A(1)) : A(0);
    const A inv = pos_lse ? A(count == 1) : (count > 0 ? A(1) / A(count) : A(0));
    p.weight[row] = w;
    p.inv_count[row] = inv;
    if (p.anchor_terms) {
      constexpr A kLog2e = A(1.4426950408889634);
      float* t = p.anchor_terms + 4 * row;
      t[0] = w == A(0) ? 0.0f : float(p.lse[row] * kLog2e);
      t[1] = float(A(kGScale) * w);
      t[2] = pos_lse && inv == A(0) ? -1.0f : float(inv);
      t[3] = pos_lse ? float(p.lse_positive[row] * kLog2e) : 0.0f;
    }
    if (p.positive_coef) p.positive_coef[row] = p.positive_coef_scale * w * (device_exp(p.initial_logit[row] - p.lse[row]) - A(1));
  }
}

template <typename T>
struct GemmCoefParams {
  GemmRowParams<acc_t<T>> rows;  // S, shape, positives (the partials are unused)
  const acc_t<T>* lse;
  const acc_t<T>* weight;        // |w| <= 1 (normalised by the host)
  const acc_t<T>* inv_count;
  const acc_t<T>* lse_positive;  // log-sum-exp form, else null
  T* g;                          // rows x cols; may be S itself when T is the accumulation type
};

template <typename T>
__global__ void __launch_bounds__(kGemmRowThreads) gemm_row_coef_kernel(GemmCoefParams<T> q) {
  using A = acc_t<T>;
  const GemmRowParams<A>& p = q.rows;
  const int64_t row = blockIdx.x, split = blockIdx.y;
  const int64_t c0 = split * p.cols_per_split;
  const int64_t c1 = c0 + p.cols_per_split < p.cols ? c0 + p.cols_per_split : p.cols;
  const A* s = p.s + row * p.cols;
  T* g = q.g + row * p.cols;
  const int64_t label = p.labels ? p.labels[p.first_row + row] : 0;
  const A w = q.weight[row], lse = q.lse[row], inv = q.inv_count[row];
  // The positives' term: inv, or exp(s - lse_pos) (log-sum-exp form, more than one positive).
  const bool positive_exp = q.lse_positive != nullptr && inv == A(0);
  const A lse_pos = positive_exp ? q.lse_positive[row] : A(0);
  for (int64_t c = c0 + threadIdx.x; c < c1; c += kGemmRowThreads) {
    const RowColumn<A> kind = classify(p, row, c, label);
    A coef = 0;
    if (kind.candidate && w != A(0)) {
      const A logit = p.scale * s[c];
      A positive_term = 0;
      if (kind.positive) positive_term = positive_exp ? device_exp(logit - lse_pos) : inv;
      coef = A(kGScale) * w * (device_exp(logit - lse) - positive_term);
      if (kind.positive && p.exclude_positives) coef = 0;  // no candidates
    }
    g[c] = static_cast<T>(coef);  // after the read of s[c] by this thread: safe in place
  }
}

}  // namespace ssl_ops::cuda
