// Symmetric contrastive loss (NT-Xent / SimCLR, multi-view, SupCon), CPU kernel.
// (The algorithm shared with CUDA: Note [Contrastive algorithm], contrastive_check.h.)
//
// Rows z (M x D) are normalised to zh (contrastive_tiles.h); logits
// S = scale * zh zh^T are formed tile by tile and never stored whole. The
// positives of row i are P(i) = {k != i : labels[k] == labels[i]}; self is
// excluded from the softmax.
//   loss_i = log sum_{k != i} exp(S_ik) - (1 / |P(i)|) sum_{p in P(i)} S_ip
// (0 for a row without positives); reduction: none, mean over rows with
// positives, or sum. For row weights w_i = d(total) / d(loss_i):
//   G_ik = w_i (softmax_ik - 1[k in P(i)] / |P(i)|),   d zh = scale (G + G^T) zh,
// then through the normalisation.
//
// S is symmetric, so tiles are visited as unordered pairs (I, K), I <= K, once
// each: pass 1 updates the running log-sum-exp of rows I from the tile and of
// rows K from its transpose (with unit rows and a moderate temperature, from
// one exp per element shifted by the logit bound; contrastive_tiles.h); pass 2 forms H = G_IK + (G_KI)^T and adds
// scale H zh_K to d zh_I and scale H^T zh_I to d zh_K. Pairs run in rounds in
// which no block appears twice (symmetric_tile_rounds), in parallel within a
// round, so no two tasks write the same rows. The forward computes the gradient
// of the reduced loss when asked (compute_grad), so backward only scales it.
//
// Anchors: only rows [a0, a1) have losses (z gathered from several processes,
// this process's rows are the anchors). Rows outside get w_i = 0, so G_ik = 0
// there, and pairs with neither block touching the anchors are skipped: the
// work is anchors x rows, anchor-anchor pairs still visited once.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <ATen/ops/full.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/zeros_like.h>

#include <array>
#include <functional>

#include "../contrastive_check.h"
#include "contrastive_tiles.h"

namespace ssl_ops::cpu {
namespace {

template <typename C>
constexpr C kNegInf = -std::numeric_limits<C>::infinity();

template <typename C>
struct RowStats {
  std::vector<RunningLse<C>> lse;
  std::vector<C> positive_sum;
  std::vector<int64_t> positive_count;
  explicit RowStats(int64_t m) : lse(m), positive_sum(m, 0), positive_count(m, 0) {}
};

// Positive logits of a tile's columns (summed and counted down the tile),
// added to those rows' statistics once the tile is done.
template <typename C>
struct ColumnPositives {
  std::array<C, kTileRows> sum;
  std::array<int64_t, kTileRows> count;
  ColumnPositives() {
    sum.fill(0);
    count.fill(0);
  }
  void add_to(RowStats<C>& stats, int64_t k0, int64_t bk) const {
    for (int64_t k = 0; k < bk; ++k) {
      stats.positive_sum[k0 + k] += sum[k];
      stats.positive_count[k0 + k] += count[k];
    }
  }
};

// The raw dot products of rows [i0, i0 + bi) and [k0, k0 + bk).
at::Tensor tile_dots(const at::Tensor& rows, int64_t i0, int64_t bi, int64_t k0, int64_t bk) {
  return at::mm(rows.narrow(0, i0, bi), rows.narrow(0, k0, bk).t());
}

// Pass 1 with the logit bound as the shift (logit_bound_usable): one exp per
// element feeds both its row's and its column's sum.
template <typename C>
SSL_OPS_ALWAYS_INLINE inline void pass1_tile_bounded(C* s, int64_t bi, int64_t bk, int64_t i0, int64_t k0,
                                                     const int64_t* labels, C scale, C bound, bool diagonal,
                                                     RowStats<C>& stats) {
  std::array<C, kTileRows> col_sum;
  col_sum.fill(0);
  ColumnPositives<C> col_pos;
  const int64_t* col_labels = labels + k0;
  for (int64_t i = 0; i < bi; ++i) {
    C* row = s + i * bk;
    const int64_t label = labels[i0 + i];
    // Self is not a candidate: a dot product whose scaled logit is -inf.
    if (diagonal) row[i] = scale > 0 ? kNegInf<C> : -kNegInf<C>;
    // Two loops: the exps alone vectorise at full float width; the int64
    // label compares would halve it.
    C row_sum = 0, pos_sum = 0;
#pragma omp simd reduction(+ : row_sum)
    for (int64_t k = 0; k < bk; ++k) {
      const C e = tile_exp(std::fma(row[k], scale, -bound));
      row_sum += e;
      col_sum[k] += e;
    }
    int64_t pos_count = 0;
#pragma omp simd reduction(+ : pos_sum, pos_count)
    for (int64_t k = 0; k < bk; ++k) {
      const bool self = diagonal & (k == i);
      const C logit = row[k] * scale;
      const bool positive = (col_labels[k] == label) & !self;
      pos_sum += positive ? logit : C(0);
      pos_count += positive;
      col_pos.sum[k] += positive ? logit : C(0);
      col_pos.count[k] += positive;
    }
    RunningLse<C>& lse = stats.lse[i0 + i];
    lse.merge(lse.next_max(bound), row_sum);
    stats.positive_sum[i0 + i] += pos_sum;
    stats.positive_count[i0 + i] += pos_count;
  }
  if (diagonal) return;  // its transpose is itself: rows I are done
  for (int64_t k = 0; k < bk; ++k) {
    RunningLse<C>& lse = stats.lse[k0 + k];
    lse.merge(lse.next_max(bound), col_sum[k]);
  }
  col_pos.add_to(stats, k0, bk);
}

template <typename C>
SSL_OPS_ALWAYS_INLINE inline void pass1_tile(C* s, int64_t bi, int64_t bk, int64_t i0, int64_t k0, const int64_t* labels,
                C scale, bool diagonal, RowStats<C>& stats) {
  std::array<C, kTileRows> col_max, col_sum;
  col_max.fill(kNegInf<C>);
  col_sum.fill(0);
  ColumnPositives<C> col_pos;
  const int64_t* col_labels = labels + k0;
  for (int64_t i = 0; i < bi; ++i) {
    C* row = s + i * bk;
    for (int64_t k = 0; k < bk; ++k) row[k] *= scale;
    if (diagonal) row[i] = kNegInf<C>;  // self is not a candidate
    C row_max = kNegInf<C>;
    C pos_sum = 0;
    int64_t pos_count = 0;
    const int64_t label = labels[i0 + i];
#pragma omp simd reduction(max : row_max) reduction(+ : pos_sum, pos_count)
    for (int64_t k = 0; k < bk; ++k) {
      row_max = std::max(row_max, row[k]);
      col_max[k] = std::max(col_max[k], row[k]);
      const bool positive = (col_labels[k] == label) & !(diagonal & (k == i));
      pos_sum += positive ? row[k] : C(0);
      pos_count += positive;
      col_pos.sum[k] += positive ? row[k] : C(0);
      col_pos.count[k] += positive;
    }
    RunningLse<C>& lse = stats.lse[i0 + i];
    const C row_shift = lse.next_max(row_max);
    C row_sum = 0;
#pragma omp simd reduction(+ : row_sum)
    for (int64_t k = 0; k < bk; ++k) row_sum += tile_exp(row[k] - row_shift);
    lse.merge(row_shift, row_sum);
    stats.positive_sum[i0 + i] += pos_sum;
    stats.positive_count[i0 + i] += pos_count;
  }
  if (diagonal) return;  // its transpose is itself: rows I are done
  std::array<C, kTileRows> shift;
  for (int64_t k = 0; k < bk; ++k) shift[k] = stats.lse[k0 + k].next_max(col_max[k]);
  for (int64_t i = 0; i < bi; ++i) {
    const C* row = s + i * bk;
    for (int64_t k = 0; k < bk; ++k) col_sum[k] += tile_exp(row[k] - shift[k]);
  }
  for (int64_t k = 0; k < bk; ++k) stats.lse[k0 + k].merge(shift[k], col_sum[k]);
  col_pos.add_to(stats, k0, bk);
}

// Overwrites the tile of dot products with H = G_IK + (G_KI)^T. kBounded:
// softmax_ik = exp(S_ik - bound) * factor_i with factor = exp(bound - lse)
// (lse >= -bound, so factor <= exp(2 bound)): one exp per element, not two.
template <typename C, bool kBounded>
SSL_OPS_ALWAYS_INLINE inline void pass2_tile(C* s, int64_t bi, int64_t bk, int64_t i0, int64_t k0, const int64_t* labels,
                const C* lse, const C* factor, C bound, const C* inv_positives, const C* weight, C scale,
                bool diagonal) {
  const int64_t* __restrict__ col_labels = labels + k0;
  const C* __restrict__ col_lse = lse + k0;
  const C* __restrict__ col_factor = kBounded ? factor + k0 : nullptr;
  const C* __restrict__ col_inv = inv_positives + k0;
  const C* __restrict__ col_weight = weight + k0;
  for (int64_t i = 0; i < bi; ++i) {
    C* __restrict__ row = s + i * bk;
    const int64_t label = labels[i0 + i];
    const C row_lse = lse[i0 + i], row_inv = inv_positives[i0 + i], row_weight = weight[i0 + i];
    const C row_factor = kBounded ? factor[i0 + i] : C(0);
#pragma omp simd
    for (int64_t k = 0; k < bk; ++k) {
      const C logit = row[k] * scale;
      const bool positive = col_labels[k] == label;
      C row_softmax, col_softmax;
      if constexpr (kBounded) {
        const C e = tile_exp(std::fma(row[k], scale, -bound));
        row_softmax = e * row_factor;
        col_softmax = e * col_factor[k];
      } else {
        row_softmax = tile_exp(logit - row_lse);
        col_softmax = tile_exp(logit - col_lse[k]);
      }
      const C from_row = row_weight * (row_softmax - (positive ? row_inv : C(0)));
      const C from_col = col_weight[k] * (col_softmax - (positive ? col_inv[k] : C(0)));
      row[k] = (row_weight != 0 ? from_row : C(0)) + (col_weight[k] != 0 ? from_col : C(0));
    }
    if (diagonal) row[i] = 0;
  }
}

// The tile loops again, compiled for AVX2+FMA; chosen at run time.
template <typename C>
SSL_OPS_TARGET_AVX2 void pass1_tile_avx2(C* s, int64_t bi, int64_t bk, int64_t i0, int64_t k0,
                                         const int64_t* labels, C scale, bool diagonal, RowStats<C>& stats) {
  pass1_tile(s, bi, bk, i0, k0, labels, scale, diagonal, stats);
}
template <typename C>
SSL_OPS_TARGET_AVX2 void pass1_tile_bounded_avx2(C* s, int64_t bi, int64_t bk, int64_t i0, int64_t k0,
                                                 const int64_t* labels, C scale, C bound, bool diagonal,
                                                 RowStats<C>& stats) {
  pass1_tile_bounded(s, bi, bk, i0, k0, labels, scale, bound, diagonal, stats);
}
template <typename C, bool kBounded>
SSL_OPS_TARGET_AVX2 void pass2_tile_avx2(C* s, int64_t bi, int64_t bk, int64_t i0, int64_t k0,
                                         const int64_t* labels, const C* lse, const C* factor, C bound,
                                         const C* inv_positives, const C* weight, C scale, bool diagonal) {
  pass2_tile<C, kBounded>(s, bi, bk, i0, k0, labels, lse, factor, bound, inv_positives, weight, scale, diagonal);
}

struct AnchorRange {
  int64_t begin, end;
  bool touches(int64_t i0, int64_t bi) const { return i0 < end && i0 + bi > begin; }
};

void for_each_tile_pair(int64_t rows, AnchorRange anchors,
                        const std::function<void(int64_t, int64_t, int64_t, int64_t, bool)>& fn) {
  const int64_t blocks = (rows + kTileRows - 1) / kTileRows;
  for (const auto& round : symmetric_tile_rounds(blocks)) {
    at::parallel_for(0, static_cast<int64_t>(round.size()), 1, [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {
        const auto [I, K] = round[p];
        const int64_t i0 = I * kTileRows, k0 = K * kTileRows;
        const int64_t bi = std::min(kTileRows, rows - i0), bk = std::min(kTileRows, rows - k0);
        if (anchors.touches(i0, bi) || anchors.touches(k0, bk)) fn(i0, bi, k0, bk, I == K);
      }
    });
  }
}

template <typename C>
at::Tensor gradient_pass(const at::Tensor& rows, AnchorRange anchors, const int64_t* labels, const C* lse,
                         const C* inv_positives, const C* weight, C scale, bool normalize) {
  const int64_t m = rows.size(0);
  at::Tensor grad = at::zeros_like(rows);
  const bool bounded = logit_bound_usable<C>(scale, normalize);
  const C bound = std::abs(scale);
  std::vector<C> factor(bounded ? m : 0);
  for (size_t i = 0; i < factor.size(); ++i) factor[i] = std::exp(bound - lse[i]);
  const bool avx2 = cpu_has_avx2_fma();
  auto* pass2 = bounded ? (avx2 ? &pass2_tile_avx2<C, true> : &pass2_tile<C, true>)
                        : (avx2 ? &pass2_tile_avx2<C, false> : &pass2_tile<C, false>);
  for_each_tile_pair(m, anchors, [&](int64_t i0, int64_t bi, int64_t k0, int64_t bk, bool diagonal) {
    at::Tensor tile = tile_dots(rows, i0, bi, k0, bk);
    pass2(tile.data_ptr<C>(), bi, bk, i0, k0, labels, lse, factor.data(), bound, inv_positives, weight, scale,
          diagonal);
    at::Tensor grad_i = grad.narrow(0, i0, bi);
    grad_i.addmm_(tile, rows.narrow(0, k0, bk), 1, scale);
    if (!diagonal) {
      at::Tensor grad_k = grad.narrow(0, k0, bk);
      grad_k.addmm_(tile.t(), rows.narrow(0, i0, bi), 1, scale);
    }
  });
  return grad;
}

// Row weights of the reduced loss: w_i = g_i (none), g / n (mean), g (sum);
// zero for rows without positives.
template <typename C>
std::vector<C> row_weights(const int64_t* positive_count, int64_t m, Reduction reduction,
                           const at::Tensor& grad_loss) {
  int64_t valid = 0;
  for (int64_t i = 0; i < m; ++i) valid += positive_count[i] > 0;
  std::vector<C> weight(m, 0);
  const at::Tensor g = grad_loss.to(at::CppTypeToScalarType<C>::value).contiguous();
  const C* gp = g.data_ptr<C>();
  for (int64_t i = 0; i < m; ++i) {
    if (positive_count[i] == 0) continue;
    if (reduction == Reduction::None) {
      weight[i] = gp[i];
    } else {
      weight[i] = reduction == Reduction::Mean ? gp[0] / C(valid) : gp[0];
    }
  }
  return weight;
}

template <typename C>
std::vector<C> inverse_counts(const int64_t* positive_count, int64_t m) {
  std::vector<C> inv(m, 0);
  for (int64_t i = 0; i < m; ++i) inv[i] = positive_count[i] > 0 ? C(1) / C(positive_count[i]) : C(0);
  return inv;
}

template <typename C>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> sym_loss_impl(
    const at::Tensor& z, const at::Tensor& labels_in, AnchorRange anchors, double scale_d, double eps,
    bool normalize, Reduction reduction, bool compute_grad) {
  const int64_t m = z.size(0);
  const C scale = static_cast<C>(scale_d);
  const at::ScalarType compute = at::CppTypeToScalarType<C>::value;
  const NormalizedRows n = normalize_rows(z, eps, normalize, compute);
  const at::Tensor labels = labels_in.contiguous();
  const int64_t* label_ptr = labels.const_data_ptr<int64_t>();

  RowStats<C> stats(m);
  const bool bounded = logit_bound_usable<C>(scale_d, normalize);
  const C bound = static_cast<C>(std::abs(scale_d));
  const bool avx2 = cpu_has_avx2_fma();
  for_each_tile_pair(m, anchors, [&](int64_t i0, int64_t bi, int64_t k0, int64_t bk, bool diagonal) {
    at::Tensor tile = tile_dots(n.rows, i0, bi, k0, bk);
    if (bounded) {
      auto* pass1 = avx2 ? &pass1_tile_bounded_avx2<C> : &pass1_tile_bounded<C>;
      pass1(tile.data_ptr<C>(), bi, bk, i0, k0, label_ptr, scale, bound, diagonal, stats);
    } else {
      auto* pass1 = avx2 ? &pass1_tile_avx2<C> : &pass1_tile<C>;
      pass1(tile.data_ptr<C>(), bi, bk, i0, k0, label_ptr, scale, diagonal, stats);
    }
  });

  const auto opts = z.options().dtype(compute);
  at::Tensor lse = at::empty({m}, opts);
  at::Tensor positive_count = at::empty({m}, z.options().dtype(at::kLong));
  at::Tensor row_loss = at::empty({m}, opts);
  C* lse_p = lse.data_ptr<C>();
  int64_t* count_p = positive_count.data_ptr<int64_t>();
  C* loss_p = row_loss.data_ptr<C>();
  // Note [Loss rounding]: loss_i = (shift - positive mean) + log(sum), the
  // shift and the positive logit subtracted first (nearly equal, so exactly,
  // as cross-entropy's x_t - max is), not (shift + log(sum)) - mean, which
  // leaves an ulp of the shift in a small loss; and the reduction sums in
  // double, not one float add per row. Before, at D = 1 the mean was 6x further
  // from float64 than lightly's (1.0e-5 against 1.6e-6).
  double total = 0;
  int64_t valid = 0;
  for (int64_t i = 0; i < m; ++i) {
    const bool anchor = i >= anchors.begin && i < anchors.end;  // other rows' statistics are partial
    const RunningLse<C>& row = stats.lse[i];
    lse_p[i] = anchor ? row.value() : C(0);
    count_p[i] = anchor ? stats.positive_count[i] : 0;
    loss_p[i] = count_p[i] > 0 ? (row.max - stats.positive_sum[i] / C(count_p[i])) + std::log(row.sum) : C(0);
    total += static_cast<double>(loss_p[i]);
    valid += count_p[i] > 0;
  }
  at::Tensor loss = row_loss;
  if (reduction != Reduction::None) {
    const double value = reduction == Reduction::Sum ? total : (valid > 0 ? total / double(valid) : 0.0);
    loss = at::full({}, static_cast<C>(value), opts);
  }
  at::Tensor grad = at::empty({0}, z.options());
  if (compute_grad && reduction != Reduction::None) {
    const std::vector<C> weight = row_weights<C>(count_p, m, reduction, at::ones({}, opts));
    const std::vector<C> inv = inverse_counts<C>(count_p, m);
    grad = normalize_rows_backward(
        n, gradient_pass<C>(n.rows, anchors, label_ptr, lse_p, inv.data(), weight.data(), scale, normalize),
        z.scalar_type());
  }
  return {loss, lse, positive_count, grad};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> contrastive_sym_loss(
    const at::Tensor& z, const at::Tensor& labels, int64_t anchor_begin, int64_t anchor_end, double scale,
    double eps, bool normalize, int64_t reduction, bool compute_grad) {
  check_sym_contrastive_args(z, labels, anchor_begin, anchor_end, scale, eps, reduction);
  const auto r = static_cast<Reduction>(reduction);
  const AnchorRange anchors{anchor_begin, anchor_end};
  if (z.scalar_type() == at::kDouble) {
    return sym_loss_impl<double>(z, labels, anchors, scale, eps, normalize, r, compute_grad);
  }
  return sym_loss_impl<float>(z, labels, anchors, scale, eps, normalize, r, compute_grad);
}

template <typename C>
at::Tensor sym_backward_impl(const at::Tensor& grad_loss, const at::Tensor& z, const at::Tensor& labels_in,
                             AnchorRange anchors, const at::Tensor& lse_in, const at::Tensor& positive_count_in,
                             double scale, double eps, bool normalize, Reduction reduction) {
  const int64_t m = z.size(0);
  const at::ScalarType compute = at::CppTypeToScalarType<C>::value;
  const NormalizedRows n = normalize_rows(z, eps, normalize, compute);
  const at::Tensor labels = labels_in.contiguous();
  const at::Tensor lse = lse_in.to(compute).contiguous();
  const at::Tensor counts = positive_count_in.contiguous();
  const int64_t* count_p = counts.const_data_ptr<int64_t>();
  const std::vector<C> weight = row_weights<C>(count_p, m, reduction, grad_loss);
  const std::vector<C> inv = inverse_counts<C>(count_p, m);
  const at::Tensor grad_rows = gradient_pass<C>(
      n.rows, anchors, labels.const_data_ptr<int64_t>(), lse.const_data_ptr<C>(), inv.data(), weight.data(),
      static_cast<C>(scale), normalize);
  return normalize_rows_backward(n, grad_rows, z.scalar_type());
}

at::Tensor contrastive_sym_backward(const at::Tensor& grad_loss, const at::Tensor& z, const at::Tensor& labels,
                                    int64_t anchor_begin, int64_t anchor_end, const at::Tensor& lse,
                                    const at::Tensor& positive_count, double scale, double eps, bool normalize,
                                    int64_t reduction) {
  check_sym_contrastive_args(z, labels, anchor_begin, anchor_end, scale, eps, reduction);
  const auto r = static_cast<Reduction>(reduction);
  const AnchorRange anchors{anchor_begin, anchor_end};
  if (z.scalar_type() == at::kDouble) {
    return sym_backward_impl<double>(grad_loss, z, labels, anchors, lse, positive_count, scale, eps, normalize, r);
  }
  return sym_backward_impl<float>(grad_loss, z, labels, anchors, lse, positive_count, scale, eps, normalize, r);
}

}  // namespace

TORCH_LIBRARY_IMPL(ssl_ops, CPU, m) {
  m.impl("contrastive_sym_loss", &contrastive_sym_loss);
  m.impl("contrastive_sym_backward", &contrastive_sym_backward);
}

}  // namespace ssl_ops::cpu
