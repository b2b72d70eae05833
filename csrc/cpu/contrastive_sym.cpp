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
// then through the normalisation. With the positives inside the log
// (PositiveReduction::kLogSumExp, solo-learn's multi-crop SimCLR):
//   loss_i = log sum_{k != i} exp(S_ik) - log sum_{p in P(i)} exp(S_ip)
//   G_ik = w_i (softmax_ik - 1[k in P(i)] exp(S_ik - lse_pos_i)),
// lse_pos from the exps pass 1 takes anyway (bounded shift) or a running max
// of its own (so a positive far below the row's largest logit cannot
// underflow); a row with one positive keeps the mean form's arithmetic.
// Excluded (PositiveReduction::kExcluded, the negatives' part of DCL): the
// positives are no candidates, loss_i = log sum_{k not in P(i), k != i}
// exp(S_ik), G_ik = w_i softmax over those (0 at the positives); the caller
// adds its own (weighted) positive term.
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
  std::vector<RunningLse<C>> positive_lse;  // log-sum-exp form only
  RowStats(int64_t m, bool positives_lse)
      : lse(m), positive_sum(m, 0), positive_count(m, 0), positive_lse(positives_lse ? m : 0) {}
};

// Positive logits of a tile's columns (summed and counted down the tile; for
// the log-sum-exp form their largest and their exps), added to those rows'
// statistics once the tile is done.
template <typename C>
struct ColumnPositives {
  std::array<C, kTileRows> sum, max, exp_sum;
  std::array<int64_t, kTileRows> count;
  ColumnPositives() {
    sum.fill(0);
    max.fill(-std::numeric_limits<C>::infinity());
    exp_sum.fill(0);
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
template <typename C, PositiveReduction kForm>
SSL_OPS_ALWAYS_INLINE inline void pass1_tile_bounded(C* s, int64_t bi, int64_t bk, int64_t i0, int64_t k0,
                                                     const int64_t* labels, C scale, C bound, bool diagonal,
                                                     RowStats<C>& stats) {
  constexpr bool kPosLse = kForm == PositiveReduction::kLogSumExp;
  constexpr bool kExcluded = kForm == PositiveReduction::kExcluded;
  // row_exp: the row's exps again, for its positives (or, excluded, its negatives)
  std::array<C, kTileRows> col_sum, row_exp;
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
    C row_sum = 0, pos_sum = 0, pos_exp = 0;
#pragma omp simd reduction(+ : row_sum)
    for (int64_t k = 0; k < bk; ++k) {
      const C e = tile_exp(std::fma(row[k], scale, -bound));
      if constexpr (!kExcluded) {
        row_sum += e;
        col_sum[k] += e;
      }
      if constexpr (kPosLse || kExcluded) row_exp[k] = e;
    }
    int64_t pos_count = 0;
#pragma omp simd reduction(+ : pos_sum, pos_count, pos_exp, row_sum)
    for (int64_t k = 0; k < bk; ++k) {
      const bool self = diagonal & (k == i);
      const C logit = row[k] * scale;
      const bool positive = (col_labels[k] == label) & !self;
      pos_sum += positive ? logit : C(0);
      pos_count += positive;
      col_pos.sum[k] += positive ? logit : C(0);
      col_pos.count[k] += positive;
      if constexpr (kPosLse) {
        const C e = positive ? row_exp[k] : C(0);
        pos_exp += e;
        col_pos.exp_sum[k] += e;
      }
      if constexpr (kExcluded) {  // summed apart, not subtracted: no cancellation
        const C e = positive ? C(0) : row_exp[k];
        row_sum += e;
        col_sum[k] += e;
      }
    }
    RunningLse<C>& lse = stats.lse[i0 + i];
    lse.merge(lse.next_max(bound), row_sum);
    if constexpr (kPosLse) stats.positive_lse[i0 + i].merge(bound, pos_exp);
    stats.positive_sum[i0 + i] += pos_sum;
    stats.positive_count[i0 + i] += pos_count;
  }
  if (diagonal) return;  // its transpose is itself: rows I are done
  for (int64_t k = 0; k < bk; ++k) {
    RunningLse<C>& lse = stats.lse[k0 + k];
    lse.merge(lse.next_max(bound), col_sum[k]);
    if constexpr (kPosLse) stats.positive_lse[k0 + k].merge(bound, col_pos.exp_sum[k]);
  }
  col_pos.add_to(stats, k0, bk);
}

template <typename C, PositiveReduction kForm>
SSL_OPS_ALWAYS_INLINE inline void pass1_tile(C* s, int64_t bi, int64_t bk, int64_t i0, int64_t k0, const int64_t* labels,
                C scale, bool diagonal, RowStats<C>& stats) {
  constexpr bool kPosLse = kForm == PositiveReduction::kLogSumExp;
  constexpr bool kExcluded = kForm == PositiveReduction::kExcluded;
  std::array<C, kTileRows> col_max, col_sum;
  col_max.fill(kNegInf<C>);
  col_sum.fill(0);
  ColumnPositives<C> col_pos;
  const int64_t* col_labels = labels + k0;
  for (int64_t i = 0; i < bi; ++i) {
    C* row = s + i * bk;
    for (int64_t k = 0; k < bk; ++k) row[k] *= scale;
    if (diagonal) row[i] = kNegInf<C>;  // self is not a candidate
    C row_max = kNegInf<C>, pos_max = kNegInf<C>;
    C pos_sum = 0;
    int64_t pos_count = 0;
    const int64_t label = labels[i0 + i];
#pragma omp simd reduction(max : row_max) reduction(+ : pos_sum, pos_count)
    for (int64_t k = 0; k < bk; ++k) {
      const bool positive = (col_labels[k] == label) & !(diagonal & (k == i));
      const C candidate = kExcluded && positive ? kNegInf<C> : row[k];  // excluded: max over negatives
      row_max = std::max(row_max, candidate);
      col_max[k] = std::max(col_max[k], candidate);
      pos_sum += positive ? row[k] : C(0);
      pos_count += positive;
      col_pos.sum[k] += positive ? row[k] : C(0);
      col_pos.count[k] += positive;
    }
    if constexpr (kPosLse) {
      // A loop of its own, plain compares: reduced as a second max in the
      // simd loop above, the build lost the positives' max (-inf lse_pos for
      // rows whose positive logits were all negative, in full 128-row tiles;
      // seen with GCC, cause not pinned down; a kernel test holds it).
      for (int64_t k = 0; k < bk; ++k) {
        const bool positive = (col_labels[k] == label) & !(diagonal & (k == i));
        const C value = positive ? row[k] : kNegInf<C>;
        pos_max = value > pos_max ? value : pos_max;
        col_pos.max[k] = value > col_pos.max[k] ? value : col_pos.max[k];
      }
    }
    RunningLse<C>& lse = stats.lse[i0 + i];
    const C row_shift = lse.next_max(row_max);
    C row_sum = 0;
#pragma omp simd reduction(+ : row_sum)
    for (int64_t k = 0; k < bk; ++k) {
      const bool skip = kExcluded && (col_labels[k] == label) & !(diagonal & (k == i));
      row_sum += skip ? C(0) : tile_exp(row[k] - row_shift);
    }
    lse.merge(row_shift, row_sum);
    if constexpr (kPosLse) {
      // The positives' own shift: relative to the row's largest logit, a
      // positive 87 below it would vanish from lse_pos.
      RunningLse<C>& pos_lse = stats.positive_lse[i0 + i];
      const C pos_shift = pos_lse.next_max(pos_max);
      C pos_exp = 0;
#pragma omp simd reduction(+ : pos_exp)
      for (int64_t k = 0; k < bk; ++k) {
        const bool positive = (col_labels[k] == label) & !(diagonal & (k == i));
        pos_exp += positive ? tile_exp(row[k] - pos_shift) : C(0);
      }
      pos_lse.merge(pos_shift, pos_exp);
    }
    stats.positive_sum[i0 + i] += pos_sum;
    stats.positive_count[i0 + i] += pos_count;
  }
  if (diagonal) return;  // its transpose is itself: rows I are done
  std::array<C, kTileRows> shift;
  for (int64_t k = 0; k < bk; ++k) shift[k] = stats.lse[k0 + k].next_max(col_max[k]);
  for (int64_t i = 0; i < bi; ++i) {
    const C* row = s + i * bk;
    const int64_t label = labels[i0 + i];
    for (int64_t k = 0; k < bk; ++k) {
      const bool skip = kExcluded && col_labels[k] == label;  // off the diagonal: no self here
      col_sum[k] += skip ? C(0) : tile_exp(row[k] - shift[k]);
    }
  }
  for (int64_t k = 0; k < bk; ++k) stats.lse[k0 + k].merge(shift[k], col_sum[k]);
  if constexpr (kPosLse) {
    std::array<C, kTileRows> pos_shift;
    for (int64_t k = 0; k < bk; ++k) pos_shift[k] = stats.positive_lse[k0 + k].next_max(col_pos.max[k]);
    ColumnPositives<C> col_exp;
    for (int64_t i = 0; i < bi; ++i) {
      const C* row = s + i * bk;
      const int64_t label = labels[i0 + i];
      for (int64_t k = 0; k < bk; ++k) {
        col_exp.exp_sum[k] += col_labels[k] == label ? tile_exp(row[k] - pos_shift[k]) : C(0);
      }
    }
    for (int64_t k = 0; k < bk; ++k) stats.positive_lse[k0 + k].merge(pos_shift[k], col_exp.exp_sum[k]);
  }
  col_pos.add_to(stats, k0, bk);
}

// Per-row inputs of the gradient pass.
template <typename C>
struct RowCoefs {
  const C* lse;
  const C* factor;         // exp(bound - lse) (bounded shift)
  const C* inv_positives;  // the positive term where it is constant: 1 / |P|, else 0
  const C* pos_lse;        // log-sum-exp form: lse_pos where the term is exp(S - lse_pos), else 0
  const C* pos_factor;     // exp(bound - lse_pos) there, else 0 (bounded shift)
  const C* weight;
};

// Overwrites the tile of dot products with H = G_IK + (G_KI)^T. kBounded:
// softmax_ik = exp(S_ik - bound) * factor_i with factor = exp(bound - lse)
// (lse >= -bound, so factor <= exp(2 bound)): one exp per element, not two;
// the log-sum-exp form's positive term is the same exp times pos_factor.
template <typename C, bool kBounded, PositiveReduction kForm>
SSL_OPS_ALWAYS_INLINE inline void pass2_tile(C* s, int64_t bi, int64_t bk, int64_t i0, int64_t k0, const int64_t* labels,
                const RowCoefs<C>& rc, C bound, C scale, bool diagonal) {
  constexpr bool kPosLse = kForm == PositiveReduction::kLogSumExp;
  constexpr bool kExcluded = kForm == PositiveReduction::kExcluded;
  const int64_t* __restrict__ col_labels = labels + k0;
  const C* __restrict__ col_lse = rc.lse + k0;
  const C* __restrict__ col_factor = kBounded ? rc.factor + k0 : nullptr;
  const C* __restrict__ col_inv = rc.inv_positives + k0;
  const C* __restrict__ col_pos_lse = kPosLse && !kBounded ? rc.pos_lse + k0 : nullptr;
  const C* __restrict__ col_pos_factor = kPosLse && kBounded ? rc.pos_factor + k0 : nullptr;
  const C* __restrict__ col_weight = rc.weight + k0;
  for (int64_t i = 0; i < bi; ++i) {
    C* __restrict__ row = s + i * bk;
    const int64_t r = i0 + i;
    const int64_t label = labels[r];
    const C row_lse = rc.lse[r], row_inv = rc.inv_positives[r], row_weight = rc.weight[r];
    const C row_factor = kBounded ? rc.factor[r] : C(0);
    const C row_pos_lse = kPosLse && !kBounded ? rc.pos_lse[r] : C(0);
    const C row_pos_factor = kPosLse && kBounded ? rc.pos_factor[r] : C(0);
#pragma omp simd
    for (int64_t k = 0; k < bk; ++k) {
      const C logit = row[k] * scale;
      const bool positive = col_labels[k] == label;
      C row_softmax, col_softmax, row_pos = 0, col_pos = 0;
      if constexpr (kBounded) {
        const C e = tile_exp(std::fma(row[k], scale, -bound));
        row_softmax = e * row_factor;
        col_softmax = e * col_factor[k];
        if constexpr (kPosLse) {
          row_pos = e * row_pos_factor;
          col_pos = e * col_pos_factor[k];
        }
      } else {
        row_softmax = tile_exp(logit - row_lse);
        col_softmax = tile_exp(logit - col_lse[k]);
        if constexpr (kPosLse) {
          row_pos = tile_exp(logit - row_pos_lse);
          col_pos = tile_exp(logit - col_pos_lse[k]);
        }
      }
      // Excluded: the positives are no candidates, so their coefficient is 0.
      const C row_positive = kExcluded ? row_softmax : ((!kPosLse || row_inv != 0) ? row_inv : row_pos);
      const C col_positive = kExcluded ? col_softmax : ((!kPosLse || col_inv[k] != 0) ? col_inv[k] : col_pos);
      const C from_row = row_weight * (row_softmax - (positive ? row_positive : C(0)));
      const C from_col = col_weight[k] * (col_softmax - (positive ? col_positive : C(0)));
      row[k] = (row_weight != 0 ? from_row : C(0)) + (col_weight[k] != 0 ? from_col : C(0));
    }
    if (diagonal) row[i] = 0;
  }
}

// The tile loops again, compiled for AVX2+FMA; chosen at run time.
template <typename C, PositiveReduction kForm>
SSL_OPS_TARGET_AVX2 void pass1_tile_avx2(C* s, int64_t bi, int64_t bk, int64_t i0, int64_t k0,
                                         const int64_t* labels, C scale, bool diagonal, RowStats<C>& stats) {
  pass1_tile<C, kForm>(s, bi, bk, i0, k0, labels, scale, diagonal, stats);
}
template <typename C, PositiveReduction kForm>
SSL_OPS_TARGET_AVX2 void pass1_tile_bounded_avx2(C* s, int64_t bi, int64_t bk, int64_t i0, int64_t k0,
                                                 const int64_t* labels, C scale, C bound, bool diagonal,
                                                 RowStats<C>& stats) {
  pass1_tile_bounded<C, kForm>(s, bi, bk, i0, k0, labels, scale, bound, diagonal, stats);
}
template <typename C, bool kBounded, PositiveReduction kForm>
SSL_OPS_TARGET_AVX2 void pass2_tile_avx2(C* s, int64_t bi, int64_t bk, int64_t i0, int64_t k0,
                                         const int64_t* labels, const RowCoefs<C>& rc, C bound, C scale,
                                         bool diagonal) {
  pass2_tile<C, kBounded, kForm>(s, bi, bk, i0, k0, labels, rc, bound, scale, diagonal);
}

// The compiled variant for this call: shift (bounded or running max), form
// of the positives, and ISA.
template <typename C>
using Pass1 = void (*)(C*, int64_t, int64_t, int64_t, int64_t, const int64_t*, C, C, bool, RowStats<C>&);
template <typename C, bool kBounded, PositiveReduction kForm>
void pass1_variant(C* s, int64_t bi, int64_t bk, int64_t i0, int64_t k0, const int64_t* labels, C scale, C bound,
                   bool diagonal, RowStats<C>& stats) {
  if constexpr (kBounded) {
    pass1_tile_bounded<C, kForm>(s, bi, bk, i0, k0, labels, scale, bound, diagonal, stats);
  } else {
    pass1_tile<C, kForm>(s, bi, bk, i0, k0, labels, scale, diagonal, stats);
  }
}
template <typename C, bool kBounded, PositiveReduction kForm>
void pass1_variant_avx2(C* s, int64_t bi, int64_t bk, int64_t i0, int64_t k0, const int64_t* labels, C scale,
                        C bound, bool diagonal, RowStats<C>& stats) {
  if constexpr (kBounded) {
    pass1_tile_bounded_avx2<C, kForm>(s, bi, bk, i0, k0, labels, scale, bound, diagonal, stats);
  } else {
    pass1_tile_avx2<C, kForm>(s, bi, bk, i0, k0, labels, scale, diagonal, stats);
  }
}
template <typename C, bool kBounded, PositiveReduction kForm>
Pass1<C> pick_pass1(bool avx2) {
  return avx2 ? &pass1_variant_avx2<C, kBounded, kForm> : &pass1_variant<C, kBounded, kForm>;
}
template <typename C, bool kBounded>
Pass1<C> pick_pass1(PositiveReduction form, bool avx2) {
  switch (form) {
    case PositiveReduction::kLogSumExp: return pick_pass1<C, kBounded, PositiveReduction::kLogSumExp>(avx2);
    case PositiveReduction::kExcluded: return pick_pass1<C, kBounded, PositiveReduction::kExcluded>(avx2);
    default: return pick_pass1<C, kBounded, PositiveReduction::kMean>(avx2);
  }
}
template <typename C>
Pass1<C> choose_pass1(bool bounded, PositiveReduction form, bool avx2) {
  return bounded ? pick_pass1<C, true>(form, avx2) : pick_pass1<C, false>(form, avx2);
}

template <typename C>
using Pass2 = void (*)(C*, int64_t, int64_t, int64_t, int64_t, const int64_t*, const RowCoefs<C>&, C, C, bool);
template <typename C, bool kBounded, PositiveReduction kForm>
Pass2<C> pick_pass2(bool avx2) {
  return avx2 ? &pass2_tile_avx2<C, kBounded, kForm> : &pass2_tile<C, kBounded, kForm>;
}
template <typename C, bool kBounded>
Pass2<C> pick_pass2(PositiveReduction form, bool avx2) {
  switch (form) {
    case PositiveReduction::kLogSumExp: return pick_pass2<C, kBounded, PositiveReduction::kLogSumExp>(avx2);
    case PositiveReduction::kExcluded: return pick_pass2<C, kBounded, PositiveReduction::kExcluded>(avx2);
    default: return pick_pass2<C, kBounded, PositiveReduction::kMean>(avx2);
  }
}
template <typename C>
Pass2<C> choose_pass2(bool bounded, PositiveReduction form, bool avx2) {
  return bounded ? pick_pass2<C, true>(form, avx2) : pick_pass2<C, false>(form, avx2);
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

// The positive term of each row's gradient: inv_positives = 1 / |P| in the
// mean form; in the log-sum-exp form 1 for a row with one positive (the mean
// form's arithmetic), else 0 and pos_lse = lse_pos, the term exp(S - lse_pos);
// excluded, none (inv_positives unused).
template <typename C>
struct PositiveTerms {
  PositiveReduction form;
  std::vector<C> inv_positives, pos_lse;
  PositiveTerms(const int64_t* positive_count, const C* lse_positive, int64_t m, PositiveReduction form_in)
      : form(form_in), inv_positives(m, 0), pos_lse(form_in == PositiveReduction::kLogSumExp ? m : 0, 0) {
    const bool pos_lse_form = form == PositiveReduction::kLogSumExp;
    for (int64_t i = 0; i < m; ++i) {
      const int64_t count = positive_count[i];
      if (count == 0) continue;
      if (!pos_lse_form) {
        inv_positives[i] = C(1) / C(count);
      } else if (count == 1) {
        inv_positives[i] = 1;
      } else {
        pos_lse[i] = lse_positive[i];
      }
    }
  }
};

template <typename C>
at::Tensor gradient_pass(const at::Tensor& rows, AnchorRange anchors, const int64_t* labels, const C* lse,
                         const PositiveTerms<C>& positives, const C* weight, C scale, bool normalize) {
  const int64_t m = rows.size(0);
  at::Tensor grad = at::zeros_like(rows);
  const bool bounded = logit_bound_usable<C>(scale, normalize);
  const bool pos_lse_form = positives.form == PositiveReduction::kLogSumExp;
  const C bound = std::abs(scale);
  std::vector<C> factor(bounded ? m : 0), pos_factor(bounded && pos_lse_form ? m : 0);
  for (size_t i = 0; i < factor.size(); ++i) factor[i] = std::exp(bound - lse[i]);
  for (size_t i = 0; i < pos_factor.size(); ++i) {
    // lse_pos >= -bound, so the factor <= exp(2 bound), as for the softmax.
    pos_factor[i] = positives.inv_positives[i] == 0 ? std::exp(bound - positives.pos_lse[i]) : C(0);
  }
  const RowCoefs<C> rc{lse, factor.data(), positives.inv_positives.data(), positives.pos_lse.data(),
                       pos_factor.data(), weight};
  const Pass2<C> pass2 = choose_pass2<C>(bounded, positives.form, cpu_has_avx2_fma());
  for_each_tile_pair(m, anchors, [&](int64_t i0, int64_t bi, int64_t k0, int64_t bk, bool diagonal) {
    at::Tensor tile = tile_dots(rows, i0, bi, k0, bk);
    pass2(tile.data_ptr<C>(), bi, bk, i0, k0, labels, rc, bound, scale, diagonal);
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

using SymOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

template <typename C>
SymOutputs sym_loss_impl(const at::Tensor& z, const at::Tensor& labels_in, AnchorRange anchors, double scale_d,
                         double eps, bool normalize, Reduction reduction, bool compute_grad,
                         PositiveReduction form) {
  const bool pos_lse_form = form == PositiveReduction::kLogSumExp;
  const int64_t m = z.size(0);
  const C scale = static_cast<C>(scale_d);
  const at::ScalarType compute = at::CppTypeToScalarType<C>::value;
  const NormalizedRows n = normalize_rows(z, eps, normalize, compute);
  const at::Tensor labels = labels_in.contiguous();
  const int64_t* label_ptr = labels.const_data_ptr<int64_t>();

  RowStats<C> stats(m, pos_lse_form);
  const bool bounded = logit_bound_usable<C>(scale_d, normalize);
  const C bound = static_cast<C>(std::abs(scale_d));
  const Pass1<C> pass1 = choose_pass1<C>(bounded, form, cpu_has_avx2_fma());
  for_each_tile_pair(m, anchors, [&](int64_t i0, int64_t bi, int64_t k0, int64_t bk, bool diagonal) {
    at::Tensor tile = tile_dots(n.rows, i0, bi, k0, bk);
    pass1(tile.data_ptr<C>(), bi, bk, i0, k0, label_ptr, scale, bound, diagonal, stats);
  });

  const auto opts = z.options().dtype(compute);
  at::Tensor lse = at::empty({m}, opts);
  at::Tensor positive_count = at::empty({m}, z.options().dtype(at::kLong));
  at::Tensor lse_positive = at::zeros({pos_lse_form ? m : 0}, opts);
  at::Tensor row_loss = at::empty({m}, opts);
  C* lse_p = lse.data_ptr<C>();
  int64_t* count_p = positive_count.data_ptr<int64_t>();
  C* lse_pos_p = lse_positive.data_ptr<C>();
  C* loss_p = row_loss.data_ptr<C>();
  // Note [Loss rounding]: loss_i = (shift - positive mean) + log(sum), the
  // shift and the positive logit subtracted first (nearly equal, so exactly,
  // as cross-entropy's x_t - max is), not (shift + log(sum)) - mean, which
  // leaves an ulp of the shift in a small loss; and the reduction sums in
  // double, not one float add per row. Before, at D = 1 the mean was 6x further
  // from float64 than lightly's (1.0e-5 against 1.6e-6). The log-sum-exp form
  // likewise subtracts the shifts first, then the logs.
  double total = 0;
  int64_t valid = 0;
  for (int64_t i = 0; i < m; ++i) {
    const bool anchor = i >= anchors.begin && i < anchors.end;  // other rows' statistics are partial
    const RunningLse<C>& row = stats.lse[i];
    lse_p[i] = anchor ? row.value() : C(0);
    count_p[i] = anchor ? stats.positive_count[i] : 0;
    if (count_p[i] == 0) {
      loss_p[i] = 0;
    } else if (form == PositiveReduction::kExcluded) {
      loss_p[i] = row.value();  // the negatives' log-sum-exp alone; the caller adds the positive term
    } else if (!pos_lse_form || count_p[i] == 1) {
      loss_p[i] = (row.max - stats.positive_sum[i] / C(count_p[i])) + std::log(row.sum);
      if (pos_lse_form) lse_pos_p[i] = stats.positive_sum[i];  // the one positive logit
    } else {
      const RunningLse<C>& pos = stats.positive_lse[i];
      loss_p[i] = (row.max - pos.max) + (std::log(row.sum) - std::log(pos.sum));
      lse_pos_p[i] = pos.value();
    }
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
    const PositiveTerms<C> positives(count_p, lse_pos_p, m, form);
    grad = normalize_rows_backward(
        n, gradient_pass<C>(n.rows, anchors, label_ptr, lse_p, positives, weight.data(), scale, normalize),
        z.scalar_type());
  }
  return {loss, lse, positive_count, grad, lse_positive};
}


SymOutputs contrastive_sym_loss(const at::Tensor& z, const at::Tensor& labels, int64_t anchor_begin,
                                int64_t anchor_end, double scale, double eps, bool normalize, int64_t reduction,
                                bool compute_grad, int64_t positives) {
  check_sym_contrastive_args(z, labels, anchor_begin, anchor_end, scale, eps, reduction, positives);
  const auto r = static_cast<Reduction>(reduction);
  const AnchorRange anchors{anchor_begin, anchor_end};
  const auto form = static_cast<PositiveReduction>(positives);
  if (z.scalar_type() == at::kDouble) {
    return sym_loss_impl<double>(z, labels, anchors, scale, eps, normalize, r, compute_grad, form);
  }
  return sym_loss_impl<float>(z, labels, anchors, scale, eps, normalize, r, compute_grad, form);
}

template <typename C>
at::Tensor sym_backward_impl(const at::Tensor& grad_loss, const at::Tensor& z, const at::Tensor& labels_in,
                             AnchorRange anchors, const at::Tensor& lse_in, const at::Tensor& positive_count_in,
                             const std::optional<at::Tensor>& lse_positive_in, PositiveReduction form,
                             double scale, double eps, bool normalize, Reduction reduction) {
  const bool pos_lse_form = form == PositiveReduction::kLogSumExp;
  const int64_t m = z.size(0);
  const at::ScalarType compute = at::CppTypeToScalarType<C>::value;
  const NormalizedRows n = normalize_rows(z, eps, normalize, compute);
  const at::Tensor labels = labels_in.contiguous();
  const at::Tensor lse = lse_in.to(compute).contiguous();
  const at::Tensor counts = positive_count_in.contiguous();
  const int64_t* count_p = counts.const_data_ptr<int64_t>();
  const at::Tensor lse_positive = pos_lse_form ? lse_positive_in->to(compute).contiguous() : at::Tensor();
  const std::vector<C> weight = row_weights<C>(count_p, m, reduction, grad_loss);
  const PositiveTerms<C> positives(count_p, pos_lse_form ? lse_positive.const_data_ptr<C>() : nullptr, m, form);
  const at::Tensor grad_rows = gradient_pass<C>(n.rows, anchors, labels.const_data_ptr<int64_t>(),
                                                lse.const_data_ptr<C>(), positives, weight.data(),
                                                static_cast<C>(scale), normalize);
  return normalize_rows_backward(n, grad_rows, z.scalar_type());
}

at::Tensor contrastive_sym_backward(const at::Tensor& grad_loss, const at::Tensor& z, const at::Tensor& labels,
                                    int64_t anchor_begin, int64_t anchor_end, const at::Tensor& lse,
                                    const at::Tensor& positive_count, double scale, double eps, bool normalize,
                                    int64_t reduction, const std::optional<at::Tensor>& lse_positive,
                                    int64_t positives) {
  check_sym_contrastive_args(z, labels, anchor_begin, anchor_end, scale, eps, reduction, positives);
  check_sym_lse_positive(z, lse_positive, positives);
  const auto r = static_cast<Reduction>(reduction);
  const AnchorRange anchors{anchor_begin, anchor_end};
  const auto form = static_cast<PositiveReduction>(positives);
  if (z.scalar_type() == at::kDouble) {
    return sym_backward_impl<double>(grad_loss, z, labels, anchors, lse, positive_count, lse_positive, form,
                                     scale, eps, normalize, r);
  }
  return sym_backward_impl<float>(grad_loss, z, labels, anchors, lse, positive_count, lse_positive, form, scale,
                                  eps, normalize, r);
}

}  // namespace

TORCH_LIBRARY_IMPL(ssl_ops, CPU, m) {
  m.impl("contrastive_sym_loss", &contrastive_sym_loss);
  m.impl("contrastive_sym_backward", &contrastive_sym_backward);
}

}  // namespace ssl_ops::cpu
