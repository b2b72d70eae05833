// Asymmetric contrastive loss (InfoNCE: MoCo with a queue, MoCo v3, CLIP), CPU kernel.
// (The algorithm shared with CUDA: Note [Contrastive algorithm], contrastive_check.h.)
//
// Anchors q (M x D) against candidates k (L x D), rows normalised (qh, kh), and
// optionally a positive_key p (M x D). Logits S = scale * qh kh^T, formed tile
// by tile and never stored whole.
//   with p:    row i scores [scale qh_i . ph_i, S_i1 .. S_iL]; the positive is the
//              first (MoCo: k is the queue, p the momentum keys);
//   without p: row i scores S_i1 .. S_iL; the positive is S_i,i+o (M + o <= L;
//              MoCo v3, CLIP; o = positive_offset places this process's queries
//              among keys gathered from every process, else 0).
//   loss_i = logsumexp(row i) - positive_i; reduction none, mean or sum.
// For row weights w_i = d(total) / d(loss_i), with P the softmax of row i:
//   G_ij = w_i (P_ij - 1[no p and j == i + o]),  g_i = w_i (P_i,positive - 1) (with p)
//   d qh = scale (G kh + g ph),  d kh = scale G^T qh,  d ph = scale g qh
// then through the normalisation.
//
// Log-sum-exps are shifted by the logit bound |scale| where rows are unit
// vectors and that cannot underflow, else by the row's max. Where a panel of
// rows against every candidate fits (kPanelElements), the forward walks the
// panels one after another, each GEMM on every thread: S, then the row
// softmaxes turned into G in place, then d qh = G kh and d kh += G^T qh, so no
// logit is formed twice. Wider candidate sets run on tiles (128 x 512, row
// blocks in parallel): pass 1 keeps a running log-sum-exp per row (and, with
// only q needing a gradient, the softmax-weighted keys online); the gradient
// pass forms the tiles again, over row blocks for d qh and column blocks for
// d kh, so every task writes its own rows. The forward computes the gradients
// of a reduced loss that are asked for (grad_mask), so backward only scales
// them; the backward op (reduction none) runs on tiles.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/full.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <ATen/TensorOperators.h>
#include <torch/library.h>

#include <array>
#include <limits>
#include <optional>
#include <utility>

#include "../contrastive_check.h"
#include "contrastive_tiles.h"

namespace ssl_ops::cpu {
namespace {

// Running log-sum-exp of rows I over one tile; records S_ii where the tile
// holds the diagonal (the positive, without positive_key). With `alpha`, the
// tile is overwritten with exp(S - new running max) and alpha_i is the factor
// that rescales row i's earlier sums to the new max (online softmax).
// With `bounded`, `bound` is an upper bound of every logit (|scale| for
// normalised rows) and serves as the shift: one pass over the tile, no max.
template <typename C>
SSL_OPS_ALWAYS_INLINE inline void asym_pass1_tile(C* s, int64_t bi, int64_t bj, int64_t i0, int64_t j0,
                                                  C scale, bool bounded, C bound, RunningLse<C>* lse,
                                                  C* diagonal_logit, C* alpha) {
  for (int64_t i = 0; i < bi; ++i) {
    C* __restrict__ row = s + i * bj;
    const int64_t diagonal = i0 + i - j0;
    if (diagonal_logit != nullptr && diagonal >= 0 && diagonal < bj) diagonal_logit[i0 + i] = row[diagonal] * scale;
    RunningLse<C>& state = lse[i0 + i];
    C shift;
    if (bounded) {
      shift = state.next_max(bound);
    } else {
      C row_max = -std::numeric_limits<C>::infinity();
#pragma omp simd reduction(max : row_max)
      for (int64_t j = 0; j < bj; ++j) row_max = std::max(row_max, row[j] * scale);
      shift = state.next_max(row_max);
    }
    C sum = 0;
    if (alpha != nullptr) {
      alpha[i] = tile_exp(state.max - shift);
#pragma omp simd reduction(+ : sum)
      for (int64_t j = 0; j < bj; ++j) {
        row[j] = tile_exp(std::fma(row[j], scale, -shift));
        sum += row[j];
      }
    } else {
#pragma omp simd reduction(+ : sum)
      for (int64_t j = 0; j < bj; ++j) sum += tile_exp(std::fma(row[j], scale, -shift));
    }
    state.merge(shift, sum);
  }
}

// Overwrites the tile of dot products with G (rows I, columns J).
template <typename C>
SSL_OPS_ALWAYS_INLINE inline void asym_pass2_tile(C* s, int64_t bi, int64_t bj, int64_t i0, int64_t j0, C scale,
                                                  const C* lse, const C* weight, bool diagonal_positive) {
  for (int64_t i = 0; i < bi; ++i) {
    C* __restrict__ row = s + i * bj;
    const C row_lse = lse[i0 + i], row_weight = weight[i0 + i];
#pragma omp simd
    for (int64_t j = 0; j < bj; ++j) row[j] = row_weight * tile_exp(row[j] * scale - row_lse);
    const int64_t diagonal = i0 + i - j0;
    if (diagonal_positive && diagonal >= 0 && diagonal < bj) row[diagonal] -= row_weight;
  }
}

template <typename C>
SSL_OPS_TARGET_AVX2 void asym_pass1_tile_avx2(C* s, int64_t bi, int64_t bj, int64_t i0, int64_t j0, C scale,
                                              bool bounded, C bound, RunningLse<C>* lse, C* diagonal_logit,
                                              C* alpha) {
  asym_pass1_tile(s, bi, bj, i0, j0, scale, bounded, bound, lse, diagonal_logit, alpha);
}
template <typename C>
SSL_OPS_TARGET_AVX2 void asym_pass2_tile_avx2(C* s, int64_t bi, int64_t bj, int64_t i0, int64_t j0, C scale,
                                              const C* lse, const C* weight, bool diagonal_positive) {
  asym_pass2_tile(s, bi, bj, i0, j0, scale, lse, weight, diagonal_positive);
}

int64_t blocks_of(int64_t rows) { return (rows + kTileRows - 1) / kTileRows; }

// Candidates per tile when walking a row block's columns: wider than the
// symmetric kernel's square tiles, so each at::mm call does more work per
// dispatch (a 128 x 512 fp32 tile, 256 KB, still sits in L2).
constexpr int64_t kColumnTile = 512;

struct Inputs {
  NormalizedRows q, k;
  std::optional<NormalizedRows> p;
  int64_t offset;  // without p: the positive of query i is key i + offset
};

Inputs normalize_inputs(const at::Tensor& query, const at::Tensor& key, const std::optional<at::Tensor>& positive,
                        int64_t offset, double eps, bool normalize, at::ScalarType compute) {
  Inputs in{normalize_rows(query, eps, normalize, compute),
            normalize_rows(key, eps, normalize, compute, /*any_layout=*/true), std::nullopt,
            offset};
  if (positive.has_value()) in.p = normalize_rows(*positive, eps, normalize, compute);
  return in;
}

template <typename C>
at::Tensor tile_G(const Inputs& in, int64_t i0, int64_t bi, int64_t j0, int64_t bj, C scale, const C* lse,
                  const C* weight) {
  at::Tensor tile = at::mm(in.q.rows.narrow(0, i0, bi), in.k.rows.narrow(0, j0, bj).t());
  auto* pass2 = cpu_has_avx2_fma() ? &asym_pass2_tile_avx2<C> : &asym_pass2_tile<C>;
  // The tile kernels find the positive on the diagonal: shift the columns' origin by the offset.
  pass2(tile.data_ptr<C>(), bi, bj, i0, j0 - in.offset, scale, lse, weight, !in.p.has_value());
  return tile;
}

// ---- Panels: rows against every candidate at once -------------------------------
// When kTileRows query rows against all L candidates fit kPanelElements, the
// forward forms a panel of S per step with one GEMM on every thread, turns it
// into the loss's log-sum-exps and, when asked, into G in place (one exp per
// logit), and multiplies G straight into d qh and d kh: S, G K and G^T Q are
// then the only GEMMs, as in eager autograd, and no tile is formed twice. (MoCo
// v3's in-batch B = 1024, D = 256, keys with gradients: tiles took 24.8 ms,
// recomputing S for each gradient; eager 18.9.) Larger L keeps the tiles.
// SSL_OPS_CONTRASTIVE_CHUNK_ELEMENTS replaces the budget (tests: partial
// panels, and 1 for the tiles).
constexpr int64_t kPanelElements = int64_t(1) << 20;  // 4 MB of fp32

int64_t panel_rows(int64_t m, int64_t l) {
  const int64_t budget = contrastive_chunk_elements(kPanelElements);
  if (budget / l < std::min(m, kTileRows)) return 0;
  return std::min(m, budget / l);
}

// One panel row: the dot products of a query with every candidate. Returns the
// shift and the sum of exp(logit - shift) over [extra (the positive key's
// logit, or -inf), scale * row]; with g_weight, overwrites the row with
// g_weight * softmax (G_ij before the positive's -1, times scale).
template <typename C>
SSL_OPS_ALWAYS_INLINE inline std::pair<C, C> panel_row(C* __restrict__ row, int64_t l, C scale, bool bounded,
                                                       C bound, C extra, const C* g_weight) {
  C shift = bound;
  if (!bounded) {
    C row_max = extra;
#pragma omp simd reduction(max : row_max)
    for (int64_t j = 0; j < l; ++j) row_max = std::max(row_max, row[j] * scale);
    shift = row_max;
  }
  C sum = 0;
  if (g_weight != nullptr) {
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < l; ++j) {
      row[j] = tile_exp(std::fma(row[j], scale, -shift));
      sum += row[j];
    }
  } else {
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < l; ++j) sum += tile_exp(std::fma(row[j], scale, -shift));
  }
  sum += tile_exp(extra - shift);  // 0 for -inf
  if (g_weight != nullptr) {
    const C factor = *g_weight / sum;
#pragma omp simd
    for (int64_t j = 0; j < l; ++j) row[j] *= factor;
  }
  return {shift, sum};
}

template <typename C>
SSL_OPS_TARGET_AVX2 std::pair<C, C> panel_row_avx2(C* row, int64_t l, C scale, bool bounded, C bound, C extra,
                                                   const C* g_weight) {
  return panel_row(row, l, scale, bounded, bound, extra, g_weight);
}

// The forward's pass on panels: each row's log-sum-exp state and (without
// positive_key) positive logit, and for a reduced loss with uniform weight w the
// gradients grad_mask asks for, before the normalisation's backward: gq = d qh,
// gk = d kh, and g_col_i = w (P_i,positive - 1) for the positive-key terms.
template <typename C>
void panel_pass(const Inputs& in, C scale, bool bounded, C bound, int64_t rows, std::array<bool, 3> grad_mask,
                C weight, RunningLse<C>* lse, C* positive_logit, at::Tensor& gq, at::Tensor& gk, at::Tensor& g_col) {
  const at::Tensor& qh = in.q.rows;
  const at::Tensor& kh = in.k.rows;
  const int64_t m = qh.size(0), l = kh.size(0);
  const bool with_p = in.p.has_value();
  const bool any_grad = grad_mask[0] || grad_mask[1] || grad_mask[2];
  const auto opts = qh.options();
  if (grad_mask[0]) gq = at::empty_like(qh);
  if (grad_mask[1]) gk = at::empty_like(kh);  // the first panel's product initialises it
  if (with_p && any_grad) g_col = at::empty({m, 1}, opts);
  C* g_col_p = g_col.defined() ? g_col.data_ptr<C>() : nullptr;
  const C g_weight = weight * scale;
  auto* row_fn = cpu_has_avx2_fma() ? &panel_row_avx2<C> : &panel_row<C>;
  at::Tensor buffer = at::empty({rows * l}, opts);
  for (int64_t i0 = 0; i0 < m; i0 += rows) {
    const int64_t bi = std::min(rows, m - i0);
    at::Tensor panel = buffer.narrow(0, 0, bi * l).view({bi, l});
    at::mm_out(panel, qh.narrow(0, i0, bi), kh.t());
    C* s = panel.data_ptr<C>();
    at::parallel_for(0, bi, std::max<int64_t>(1, 16384 / l), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t i = i0 + r;
        C* row = s + r * l;
        if (!with_p) positive_logit[i] = row[i + in.offset] * scale;
        const C extra = with_p ? positive_logit[i] : -std::numeric_limits<C>::infinity();
        const auto [shift, sum] = row_fn(row, l, scale, bounded, bound, extra, any_grad ? &g_weight : nullptr);
        lse[i].max = shift;
        lse[i].sum = sum;
        if (any_grad && !with_p) row[i + in.offset] -= g_weight;
        if (g_col_p != nullptr) g_col_p[i] = weight * (tile_exp(positive_logit[i] - shift) / sum - C(1));
      }
    });
    if (grad_mask[0]) {
      at::Tensor gq_rows = gq.narrow(0, i0, bi);
      at::mm_out(gq_rows, panel, kh);
    }
    if (grad_mask[1] && i0 == 0) {
      at::mm_out(gk, panel.t(), qh.narrow(0, i0, bi));
    } else if (grad_mask[1]) {
      gk.addmm_(panel.t(), qh.narrow(0, i0, bi));
    }
  }
}

// Gradients for row weights w; empty tensors where grad_mask is false.
// g_times_key, when defined, is sum_j G_ij kh_j already (from the online pass).
// The gradients of the inputs from those of qh (gq) and kh (gk), and g_col
// (with positive_key: g_i = w_i (P_i,positive - 1), the weight of ph_i in d qh_i
// and of qh_i in d ph_i); empty tensors where grad_mask is false.
std::array<at::Tensor, 3> finish_gradients(const Inputs& in, double scale, at::Tensor gq, const at::Tensor& gk,
                                           const at::Tensor& g_col, std::array<bool, 3> grad_mask,
                                           const std::array<at::ScalarType, 3>& out_dtypes) {
  std::array<at::Tensor, 3> out;
  const bool with_p = in.p.has_value();
  if (grad_mask[0]) {
    if (with_p) gq.add_(g_col * in.p->rows, scale);
    out[0] = normalize_rows_backward(in.q, gq, out_dtypes[0]);
  }
  if (grad_mask[1]) out[1] = normalize_rows_backward(in.k, gk, out_dtypes[1]);
  if (with_p && grad_mask[2]) out[2] = normalize_rows_backward(*in.p, g_col * in.q.rows * scale, out_dtypes[2]);
  return out;
}

// Gradients for row weights w on tiles, S formed again for each.
// g_times_key, when defined, is sum_j G_ij kh_j already (from the online pass).
template <typename C>
std::array<at::Tensor, 3> gradient_pass(const Inputs& in, C scale, const C* lse, const C* positive_logit,
                                        const C* weight, std::array<bool, 3> grad_mask,
                                        const std::array<at::ScalarType, 3>& out_dtypes,
                                        const at::Tensor& g_times_key = at::Tensor()) {
  const at::Tensor& qh = in.q.rows;
  const at::Tensor& kh = in.k.rows;
  const int64_t m = qh.size(0), l = kh.size(0);
  at::Tensor gq, gk, g_col;
  if (in.p.has_value() && (grad_mask[0] || grad_mask[2])) {
    g_col = at::empty({m, 1}, qh.options());
    C* g = g_col.data_ptr<C>();
    for (int64_t i = 0; i < m; ++i) g[i] = weight[i] * (tile_exp(positive_logit[i] - lse[i]) - C(1));
  }
  if (grad_mask[0] && g_times_key.defined()) {
    gq = g_times_key * scale;
  } else if (grad_mask[0]) {
    gq = at::zeros_like(qh);
    at::parallel_for(0, blocks_of(m), 1, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        const int64_t i0 = b * kTileRows, bi = std::min(kTileRows, m - i0);
        at::Tensor gq_i = gq.narrow(0, i0, bi);
        for (int64_t j0 = 0; j0 < l; j0 += kColumnTile) {
          const int64_t bj = std::min(kColumnTile, l - j0);
          gq_i.addmm_(tile_G<C>(in, i0, bi, j0, bj, scale, lse, weight), kh.narrow(0, j0, bj), 1, scale);
        }
      }
    });
  }
  if (grad_mask[1]) {
    gk = at::zeros_like(kh);
    at::parallel_for(0, blocks_of(l), 1, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        const int64_t j0 = b * kTileRows, bj = std::min(kTileRows, l - j0);
        at::Tensor gk_j = gk.narrow(0, j0, bj);
        for (int64_t i0 = 0; i0 < m; i0 += kTileRows) {
          const int64_t bi = std::min(kTileRows, m - i0);
          gk_j.addmm_(tile_G<C>(in, i0, bi, j0, bj, scale, lse, weight).t(), qh.narrow(0, i0, bi), 1, scale);
        }
      }
    });
  }
  return finish_gradients(in, scale, gq, gk, g_col, grad_mask, out_dtypes);
}

template <typename C>
std::vector<C> row_weights(int64_t m, Reduction reduction, const at::Tensor& grad_loss) {
  const at::Tensor g = grad_loss.to(at::CppTypeToScalarType<C>::value).contiguous();
  const C* gp = g.const_data_ptr<C>();
  std::vector<C> weight(m);
  for (int64_t i = 0; i < m; ++i) {
    weight[i] = reduction == Reduction::None ? gp[i] : (reduction == Reduction::Mean ? gp[0] / C(m) : gp[0]);
  }
  return weight;
}

std::array<at::ScalarType, 3> input_dtypes(const at::Tensor& query, const at::Tensor& key,
                                           const std::optional<at::Tensor>& positive) {
  return {query.scalar_type(), key.scalar_type(), positive ? positive->scalar_type() : query.scalar_type()};
}

at::Tensor or_empty(const at::Tensor& t, const at::Tensor& like) {
  return t.defined() ? t : at::empty({0}, like.options());
}

// The forward's pass on tiles, for L too wide for panels: each row's
// log-sum-exp state and positive logit (running holds the positive key's term
// already) and, when `online`, the softmax-weighted sum of keys per row:
// with only the query needing a gradient of a reduced loss, that sum is
// accumulated in the log-sum-exp pass itself (online softmax, as in flash
// attention), one pass over the tiles.
template <typename C>
void tile_pass(const Inputs& in, C scale, bool bounded, C bound, bool online, RunningLse<C>* running, C* pos_p,
               at::Tensor& weighted_keys) {
  const int64_t m = in.q.rows.size(0), l = in.k.rows.size(0);
  const auto opts = in.q.rows.options();
  if (online) weighted_keys = at::zeros_like(in.q.rows);
  auto* pass1 = cpu_has_avx2_fma() ? &asym_pass1_tile_avx2<C> : &asym_pass1_tile<C>;
  at::parallel_for(0, blocks_of(m), 1, [&](int64_t begin, int64_t end) {
    at::Tensor alpha = online ? at::empty({kTileRows, 1}, opts) : at::Tensor();
    at::Tensor buffer = at::empty({kTileRows * kColumnTile}, opts);  // one tile, reused
    for (int64_t b = begin; b < end; ++b) {
      const int64_t i0 = b * kTileRows, bi = std::min(kTileRows, m - i0);
      for (int64_t j0 = 0; j0 < l; j0 += kColumnTile) {
        const int64_t bj = std::min(kColumnTile, l - j0);
        at::Tensor tile = buffer.narrow(0, 0, bi * bj).view({bi, bj});
        at::mm_out(tile, in.q.rows.narrow(0, i0, bi), in.k.rows.narrow(0, j0, bj).t());
        pass1(tile.data_ptr<C>(), bi, bj, i0, j0 - in.offset, scale, bounded, bound, running,
              in.p ? nullptr : pos_p, online ? alpha.data_ptr<C>() : nullptr);
        if (online) {
          at::Tensor acc = weighted_keys.narrow(0, i0, bi);
          // The bounded shift never moves after the first tile (alpha = 1), and
          // before it the sums are 0: no rescaling.
          if (!bounded) acc.mul_(alpha.narrow(0, 0, bi));
          acc.addmm_(tile, in.k.rows.narrow(0, j0, bj));
        }
      }
    }
  });
}

template <typename C>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> asym_loss_impl(
    const at::Tensor& query, const at::Tensor& key, const std::optional<at::Tensor>& positive, int64_t offset,
    double scale_d, double eps, bool normalize, Reduction reduction, std::array<bool, 3> grad_mask) {
  const at::ScalarType compute = at::CppTypeToScalarType<C>::value;
  const C scale = static_cast<C>(scale_d);
  const Inputs in = normalize_inputs(query, key, positive, offset, eps, normalize, compute);
  const int64_t m = query.size(0), l = key.size(0);
  const auto opts = query.options().dtype(compute);
  const C bound = static_cast<C>(std::abs(scale_d));
  const bool bounded = logit_bound_usable<C>(scale_d, normalize);
  // The forward forms the gradients of a reduced loss (weights 1/M or 1 per row).
  const bool forward_grads = reduction != Reduction::None && (grad_mask[0] || grad_mask[1] || grad_mask[2]);
  const C weight = reduction == Reduction::Mean ? C(1) / C(m) : C(1);

  std::vector<RunningLse<C>> running(m);
  at::Tensor positive_logit = at::empty({m}, opts);
  C* pos_p = positive_logit.data_ptr<C>();
  if (in.p.has_value()) positive_logit.copy_(at::sum(in.q.rows * in.p->rows, {1}) * scale_d);
  const int64_t rows = panel_rows(m, l);
  const bool online = rows == 0 && forward_grads && grad_mask[0] && !grad_mask[1];
  at::Tensor gq, gk, g_col, weighted_keys;
  if (rows > 0) {
    panel_pass<C>(in, scale, bounded, bound, rows, forward_grads ? grad_mask : std::array<bool, 3>{}, weight,
                  running.data(), pos_p, gq, gk, g_col);
  } else {
    if (in.p.has_value()) {
      for (int64_t i = 0; i < m; ++i) running[i].merge(pos_p[i], C(1));  // exp(0) at its own max
    }
    tile_pass<C>(in, scale, bounded, bound, online, running.data(), pos_p, weighted_keys);
  }
  at::Tensor lse = at::empty({m}, opts);
  at::Tensor row_loss = at::empty({m}, opts);
  C* lse_p = lse.data_ptr<C>();
  C* loss_p = row_loss.data_ptr<C>();
  double total = 0;  // Note [Loss rounding] in contrastive_sym.cpp
  for (int64_t i = 0; i < m; ++i) {
    lse_p[i] = running[i].value();
    loss_p[i] = (running[i].max - pos_p[i]) + std::log(running[i].sum);
    total += static_cast<double>(loss_p[i]);
  }
  at::Tensor loss = row_loss;
  if (reduction != Reduction::None) {
    loss = at::full({}, static_cast<C>(reduction == Reduction::Sum ? total : total / double(m)), opts);
  }
  std::array<at::Tensor, 3> grads;
  if (forward_grads && rows > 0) {
    grads = finish_gradients(in, scale_d, gq, gk, g_col, grad_mask, input_dtypes(query, key, positive));
  } else if (forward_grads) {
    const std::vector<C> weights(m, weight);
    at::Tensor g_times_key;
    if (online) {
      // sum_j G_ij kh_j = w (softmax-weighted keys - kh_i [the diagonal positive]).
      at::Tensor norm = at::empty({m, 1}, opts);
      for (int64_t i = 0; i < m; ++i) norm.data_ptr<C>()[i] = weight / running[i].sum;
      g_times_key = weighted_keys * norm;
      if (!in.p.has_value()) g_times_key.sub_(in.k.rows.narrow(0, in.offset, m), weight);
    }
    grads = gradient_pass<C>(in, scale, lse_p, pos_p, weights.data(), grad_mask, input_dtypes(query, key, positive),
                             g_times_key);
  }
  return {loss, lse, or_empty(grads[0], query), or_empty(grads[1], key), or_empty(grads[2], query)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> contrastive_asym_loss(
    const at::Tensor& query, const at::Tensor& key, const std::optional<at::Tensor>& positive_key,
    int64_t positive_offset, double scale, double eps, bool normalize, int64_t reduction,
    std::array<bool, 3> grad_mask) {
  check_asym_contrastive_args(query, key, positive_key, positive_offset, scale, eps, reduction);
  const auto r = static_cast<Reduction>(reduction);
  if (query.scalar_type() == at::kDouble) {
    return asym_loss_impl<double>(query, key, positive_key, positive_offset, scale, eps, normalize, r, grad_mask);
  }
  return asym_loss_impl<float>(query, key, positive_key, positive_offset, scale, eps, normalize, r, grad_mask);
}

template <typename C>
std::tuple<at::Tensor, at::Tensor, at::Tensor> asym_backward_impl(
    const at::Tensor& grad_loss, const at::Tensor& query, const at::Tensor& key,
    const std::optional<at::Tensor>& positive, int64_t offset, const at::Tensor& lse_in, double scale_d, double eps,
    bool normalize, Reduction reduction, std::array<bool, 3> grad_mask) {
  const at::ScalarType compute = at::CppTypeToScalarType<C>::value;
  const Inputs in = normalize_inputs(query, key, positive, offset, eps, normalize, compute);
  const int64_t m = query.size(0);
  const at::Tensor lse = lse_in.to(compute).contiguous();
  at::Tensor positive_logit = at::zeros({m}, query.options().dtype(compute));
  if (in.p.has_value()) positive_logit.copy_(at::sum(in.q.rows * in.p->rows, {1}) * scale_d);
  const std::vector<C> weight = row_weights<C>(m, reduction, grad_loss);
  const auto grads = gradient_pass<C>(in, static_cast<C>(scale_d), lse.const_data_ptr<C>(),
                                      positive_logit.const_data_ptr<C>(), weight.data(), grad_mask,
                                      input_dtypes(query, key, positive));
  return {or_empty(grads[0], query), or_empty(grads[1], key), or_empty(grads[2], query)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> contrastive_asym_backward(
    const at::Tensor& grad_loss, const at::Tensor& query, const at::Tensor& key,
    const std::optional<at::Tensor>& positive_key, int64_t positive_offset, const at::Tensor& lse, double scale,
    double eps, bool normalize, int64_t reduction, std::array<bool, 3> grad_mask) {
  check_asym_contrastive_args(query, key, positive_key, positive_offset, scale, eps, reduction);
  const auto r = static_cast<Reduction>(reduction);
  const int64_t offset = positive_offset;
  if (query.scalar_type() == at::kDouble) {
    return asym_backward_impl<double>(grad_loss, query, key, positive_key, offset, lse, scale, eps, normalize, r,
                                      grad_mask);
  }
  return asym_backward_impl<float>(grad_loss, query, key, positive_key, offset, lse, scale, eps, normalize, r,
                                   grad_mask);
}

}  // namespace

TORCH_LIBRARY_IMPL(ssl_ops, CPU, m) {
  m.impl("contrastive_asym_loss", &contrastive_asym_loss);
  m.impl("contrastive_asym_backward", &contrastive_asym_backward);
}

}  // namespace ssl_ops::cpu
