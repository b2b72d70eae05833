// The symmetric in-batch InfoNCE, CPU: Note [Symmetric InfoNCE]
// (csrc/clip_check.h) in chunks of query rows (csrc/clip_chunks.h), features
// widened to the accumulation type. The chunk is all of S up to 2^26
// similarities (256 MB in float32; S is then kept for the gradient: 3 GEMMs),
// else 2^24 (64 MB): on 2 cores, CLIP B = 8192, D = 512 forward+backward took
// 2.55 s in 2^20-element chunks, 1.68 s in 2^24 and 1.38 s with S whole
// (2026-12-08): chunks of a few hundred rows starve the GEMMs.
// Where every logit is bounded (|scale| max |q_i| max |k_j| <= 30 in float,
// 300 in double: logit_bound_usable), one exp per similarity serves its row's
// sum and its column's, and one more forms G; otherwise the rows and columns
// take their own maxima (four reads and two exps for the statistics, two exps
// for G). SSL_OPS_CONTRASTIVE_CHUNK_ELEMENTS sets the chunk (tests force many).
#include <ATen/Parallel.h>
#include <ATen/ops/linalg_vector_norm.h>
#include <ATen/ops/scalar_tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "../clip_check.h"
#include "../clip_chunks.h"
#include "../contrastive_check.h"
#include "contrastive_tiles.h"

namespace ssl_ops::cpu {
namespace {

constexpr int64_t kClipChunkElements = int64_t(1) << 24;
constexpr int64_t kClipWholeElements = int64_t(1) << 26;
constexpr int64_t kColumnBlock = 256;  // columns per task of the column pass: c x 1 KB of the chunk

// Row i of the chunk: its log-sum-exp of scale * s and s_ii.
template <typename C>
SSL_OPS_ALWAYS_INLINE inline void row_stats(const C* s, int64_t rows, int64_t cols, int64_t r0, C scale, C* lse,
                                            C* diag) {
  for (int64_t i = 0; i < rows; ++i) {
    const C* __restrict__ row = s + i * cols;
    C max = -std::numeric_limits<C>::infinity();
#pragma omp simd reduction(max : max)
    for (int64_t j = 0; j < cols; ++j) max = std::max(max, scale * row[j]);
    C sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < cols; ++j) sum += tile_exp(std::fma(scale, row[j], -max));
    lse[i] = max + std::log(sum);
    diag[i] = row[r0 + i];
  }
}

// Columns [j0, j1): the running maximum and sum of exp(scale s - maximum)
// merged with the chunk's rows.
template <typename C>
SSL_OPS_ALWAYS_INLINE inline void column_stats(const C* s, int64_t rows, int64_t cols, int64_t j0, int64_t j1,
                                               C scale, bool first, C* col_max, C* col_sum) {
  C chunk_max[kColumnBlock], sum[kColumnBlock];
  const int64_t n = j1 - j0;
  for (int64_t j = 0; j < n; ++j) chunk_max[j] = -std::numeric_limits<C>::infinity();
  for (int64_t i = 0; i < rows; ++i) {
    const C* __restrict__ row = s + i * cols + j0;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) chunk_max[j] = std::max(chunk_max[j], scale * row[j]);
  }
  for (int64_t j = 0; j < n; ++j) {
    const C shift = first ? chunk_max[j] : std::max(col_max[j0 + j], chunk_max[j]);
    sum[j] = first ? C(0) : col_sum[j0 + j] * tile_exp(col_max[j0 + j] - shift);
    chunk_max[j] = shift;
  }
  for (int64_t i = 0; i < rows; ++i) {
    const C* __restrict__ row = s + i * cols + j0;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) sum[j] += tile_exp(std::fma(scale, row[j], -chunk_max[j]));
  }
  for (int64_t j = 0; j < n; ++j) {
    col_max[j0 + j] = chunk_max[j];
    col_sum[j0 + j] = sum[j];
  }
}

// Row i of the chunk: G = P + Q - 2 [i == j] over s, and the sum of G s.
// kBounded: row_term and col_term are 1 / R_i and 1 / C_j, the inverses of the
// sums of e = exp(scale s - shift), and G = e (1 / R_i + 1 / C_j) (one exp);
// otherwise they are the log-sum-exps r_i and c_j, G = exp(S - r_i) +
// exp(S - c_j).
template <typename C, bool kBounded>
SSL_OPS_ALWAYS_INLINE inline void coefficient_rows(C* s, int64_t rows, int64_t cols, int64_t r0, C scale, C shift,
                                                   const C* row_term, const C* col_term, double* g_dot_s) {
  for (int64_t i = 0; i < rows; ++i) {
    C* __restrict__ row = s + i * cols;
    const C r = row_term[i];
    const int64_t positive = r0 + i;
    const C s_positive = row[positive];
    C dot = 0;
#pragma omp simd reduction(+ : dot)
    for (int64_t j = 0; j < cols; ++j) {
      const C logit = scale * row[j];
      C g;
      if constexpr (kBounded) {
        g = tile_exp(logit - shift) * (r + col_term[j]);
      } else {
        g = tile_exp(logit - r) + tile_exp(logit - col_term[j]);
      }
      dot += g * row[j];
      row[j] = g;
    }
    row[positive] -= C(2);  // outside the vector loop, which then has no branch
    g_dot_s[i] = static_cast<double>(dot) - 2.0 * static_cast<double>(s_positive);
  }
}

// Bounded: columns [j0, j1) of the chunk, e = exp(scale s - bound) added to
// its column's sum and to its row's partial sum (row_part, one per row).
template <typename C>
SSL_OPS_ALWAYS_INLINE inline void bounded_stats(const C* s, int64_t rows, int64_t cols, int64_t j0, int64_t j1,
                                                C scale, C bound, C* row_part, C* col_sum) {
  C sum[kColumnBlock];
  const int64_t n = j1 - j0;
  for (int64_t j = 0; j < n; ++j) sum[j] = col_sum[j0 + j];
  for (int64_t i = 0; i < rows; ++i) {
    const C* __restrict__ row = s + i * cols + j0;
    C row_sum = 0;
#pragma omp simd reduction(+ : row_sum)
    for (int64_t j = 0; j < n; ++j) {
      const C e = tile_exp(std::fma(scale, row[j], -bound));
      row_sum += e;
      sum[j] += e;
    }
    row_part[i] = row_sum;
  }
  for (int64_t j = 0; j < n; ++j) col_sum[j0 + j] = sum[j];
}

template <typename C>
SSL_OPS_TARGET_AVX2 void bounded_stats_avx2(const C* s, int64_t rows, int64_t cols, int64_t j0, int64_t j1, C scale,
                                            C bound, C* row_part, C* col_sum) {
  bounded_stats(s, rows, cols, j0, j1, scale, bound, row_part, col_sum);
}
template <typename C>
SSL_OPS_TARGET_AVX2 void row_stats_avx2(const C* s, int64_t rows, int64_t cols, int64_t r0, C scale, C* lse,
                                        C* diag) {
  row_stats(s, rows, cols, r0, scale, lse, diag);
}
template <typename C>
SSL_OPS_TARGET_AVX2 void column_stats_avx2(const C* s, int64_t rows, int64_t cols, int64_t j0, int64_t j1, C scale,
                                           bool first, C* col_max, C* col_sum) {
  column_stats(s, rows, cols, j0, j1, scale, first, col_max, col_sum);
}
template <typename C, bool kBounded>
SSL_OPS_TARGET_AVX2 void coefficient_rows_avx2(C* s, int64_t rows, int64_t cols, int64_t r0, C scale, C shift,
                                               const C* row_term, const C* col_term, double* g_dot_s) {
  coefficient_rows<C, kBounded>(s, rows, cols, r0, scale, shift, row_term, col_term, g_dot_s);
}

struct CpuClipPasses {
  bool bounded = false;
  double bound = 0;  // with bounded: >= every logit

  void stats(const at::Tensor& s, int64_t r0, const at::Tensor& scale, at::Tensor row_lse, at::Tensor diag,
             at::Tensor& col_max, at::Tensor& col_sum) const {
    const int64_t rows = s.size(0), cols = s.size(1);
    const int64_t blocks = (cols + kColumnBlock - 1) / kColumnBlock;
    const bool avx2 = cpu_has_avx2_fma(), first = r0 == 0;
    auto run = [&](auto* data) {
      using C = std::remove_pointer_t<decltype(data)>;
      const C sc = static_cast<C>(scale.item<double>()), shift = static_cast<C>(bound);
      C *lse = row_lse.data_ptr<C>(), *dg = diag.data_ptr<C>();
      C *cmax = col_max.data_ptr<C>(), *csum = col_sum.data_ptr<C>();
      if (bounded) {
        if (first) {
          col_max.fill_(bound);
          col_sum.zero_();
        }
        std::vector<C> row_part(blocks * rows);  // [block][row]
        at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
          for (int64_t blk = begin; blk < end; ++blk) {
            const int64_t j0 = blk * kColumnBlock, j1 = std::min(cols, j0 + kColumnBlock);
            C* part = row_part.data() + blk * rows;
            if (avx2) {
              bounded_stats_avx2<C>(data, rows, cols, j0, j1, sc, shift, part, csum);
            } else {
              bounded_stats<C>(data, rows, cols, j0, j1, sc, shift, part, csum);
            }
          }
        });
        for (int64_t i = 0; i < rows; ++i) {
          C sum = 0;
          for (int64_t blk = 0; blk < blocks; ++blk) sum += row_part[blk * rows + i];
          lse[i] = shift + std::log(sum);
          dg[i] = data[i * cols + r0 + i];
        }
        return;
      }
      at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
        const C* block = data + begin * cols;
        if (avx2) {
          row_stats_avx2<C>(block, end - begin, cols, r0 + begin, sc, lse + begin, dg + begin);
        } else {
          row_stats<C>(block, end - begin, cols, r0 + begin, sc, lse + begin, dg + begin);
        }
      });
      at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
        for (int64_t blk = begin; blk < end; ++blk) {
          const int64_t j0 = blk * kColumnBlock, j1 = std::min(cols, j0 + kColumnBlock);
          if (avx2) {
            column_stats_avx2<C>(data, rows, cols, j0, j1, sc, first, cmax, csum);
          } else {
            column_stats<C>(data, rows, cols, j0, j1, sc, first, cmax, csum);
          }
        }
      });
    };
    if (s.scalar_type() == at::kDouble) {
      run(s.data_ptr<double>());
    } else {
      run(s.data_ptr<float>());
    }
  }

  std::pair<at::Tensor, at::Tensor> coefficients(const at::Tensor& s_const, int64_t r0, const at::Tensor& scale,
                                                 const at::Tensor& row_lse, const at::Tensor& col_lse,
                                                 const at::Tensor& /*g_half*/) const {
    at::Tensor s = s_const;  // the chunk's own buffer: G is written over it
    const int64_t rows = s.size(0), cols = s.size(1);
    std::vector<double> dots(rows);
    const bool avx2 = cpu_has_avx2_fma();
    // Bounded: exp(bound - lse) = 1 / (the sum of e), per row and per column.
    const at::Tensor row_inv = bounded ? (bound - row_lse).exp() : at::Tensor();
    const at::Tensor col_inv = bounded ? (bound - col_lse).exp() : at::Tensor();
    auto run = [&](auto* data) {
      using C = std::remove_pointer_t<decltype(data)>;
      const C sc = static_cast<C>(scale.item<double>()), shift = static_cast<C>(bound);
      const C *rl = row_lse.const_data_ptr<C>(), *cl = col_lse.const_data_ptr<C>();
      at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
        C* block = data + begin * cols;
        double* out = dots.data() + begin;
        const int64_t n = end - begin, first_row = r0 + begin;
        if (bounded) {
          const C *ri = row_inv.const_data_ptr<C>() + begin, *ci = col_inv.const_data_ptr<C>();
          if (avx2) {
            coefficient_rows_avx2<C, true>(block, n, cols, first_row, sc, shift, ri, ci, out);
          } else {
            coefficient_rows<C, true>(block, n, cols, first_row, sc, shift, ri, ci, out);
          }
        } else if (avx2) {
          coefficient_rows_avx2<C, false>(block, n, cols, first_row, sc, shift, rl + begin, cl, out);
        } else {
          coefficient_rows<C, false>(block, n, cols, first_row, sc, shift, rl + begin, cl, out);
        }
      });
    };
    if (s.scalar_type() == at::kDouble) {
      run(s.data_ptr<double>());
    } else {
      run(s.data_ptr<float>());
    }
    double total = 0;
    for (double v : dots) total += v;
    return {s, at::scalar_tensor(total, s.options().dtype(at::kDouble))};
  }
};

void cpu_mm(at::Tensor& out, const at::Tensor& a, const at::Tensor& b) { at::mm_out(out, a, b); }
void cpu_addmm(at::Tensor& acc, const at::Tensor& a, const at::Tensor& b) { acc.addmm_(a, b); }
constexpr ChunkGemms cpu_gemms{cpu_mm, cpu_addmm, /*half_operands=*/false};

ClipOutputs contrastive_clip_loss(const at::Tensor& query, const at::Tensor& key, const at::Tensor& scale,
                                  int64_t reduction, bool compute_grad) {
  check_clip_args(query, key, scale, reduction);
  const int64_t b = query.size(0);
  const int64_t chunk = contrastive_chunk_elements(b * b <= kClipWholeElements ? kClipWholeElements
                                                                               : kClipChunkElements);
  // Cauchy-Schwarz: |logit| <= |scale| max |q_i| max |k_j| (times 1 + 2^-10
  // for the GEMM's rounding), a bound for every logit that costs O(B D).
  const at::ScalarType acc = query.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  // Norms accumulated in the accumulation type without a widened copy of the rows.
  auto max_norm = [&](const at::Tensor& rows) {
    return at::linalg_vector_norm(rows, 2, at::IntArrayRef{1}, false, acc).max().item<double>();
  };
  const double bound = std::abs(scale.item<double>()) * (1.0 + 1.0 / 1024) * max_norm(query) * max_norm(key);
  CpuClipPasses passes;
  passes.bounded = acc == at::kDouble ? logit_bound_usable<double>(bound, true) : logit_bound_usable<float>(bound, true);
  passes.bound = bound;
  return clip_loss_chunked(query, key, scale, reduction, compute_grad, chunk, cpu_gemms, passes);
}

}  // namespace

TORCH_LIBRARY_IMPL(ssl_ops, CPU, m) { m.impl("contrastive_clip_loss", &contrastive_clip_loss); }

}  // namespace ssl_ops::cpu
