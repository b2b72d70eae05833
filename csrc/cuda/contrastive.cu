// Contrastive losses, CUDA host code: NT-Xent / SupCon / DCL (symmetric) and
// InfoNCE (asymmetric: MoCo, MoCo v3, CLIP). The math is the CPU kernels'
// (csrc/cpu/contrastive_sym.cpp, contrastive_asym.cpp). This file normalises
// the rows, states each loss as a GemmLossSpec and takes the gradient back
// through the normalisation; gemm_contrastive (contrastive_gemm.h) computes the
// statistics and the gradients on one of two routes. Reductions and row weights
// are small ATen ops on the device, so nothing waits for the GPU.
//
// Note [Contrastive routes]:
// - Fused (default, where fused_route_fits allows: bf16/fp16, 8 <= D <= 128 a
//   multiple of 8, bounded logits, sm_80+): tensor-core tiles that never store S
//   (contrastive_fused_stats.cuh, contrastive_fused_grad.cuh); no vendor GEMM.
// - GEMM (everything else; SSL_OPS_CUDA_CONTRASTIVE_ROUTE=gemm forces it): each
//   chunk's S_c by the vendor GEMM in fp32, row kernels for the statistics and
//   the coefficients G_c, two more GEMMs for the gradient; O(c n + n D) memory.
// - Why a fused route: the GEMM route moves 18 bytes per pair through memory and
//   launches about six kernels per chunk. Measured on an H200 (2026-11-28,
//   benchmarks/RESULTS.md): bf16, D = 128, NT-Xent 2N = 8192 forward+backward
//   1.6 ms against eager's 1.2.
// - The hand-written tile route lost every training shape at 2N >= 8192 on that
//   H200 (by up to 3x) and is gone; its figures stay in RESULTS.md.
// - Deterministic: no float atomics on either route and fixed chunk and split
//   orders, so repeated runs are bit-identical.
#include <ATen/Dispatch.h>
#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/clamp_min.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/exp.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/ones_like.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <optional>
#include <type_traits>

#include "../contrastive_check.h"
#include "compat.cuh"
#include "../message.h"
#include "contrastive_gemm.h"
#include "row_norms.cuh"
#include "launch_limits.h"

namespace ssl_ops::cuda {
namespace {

template <typename T>
const T* data(const at::Tensor& t) {
  return reinterpret_cast<const T*>(t.const_data_ptr());
}
template <typename T>
T* mutable_data(at::Tensor& t) {
  return reinterpret_cast<T*>(t.data_ptr());
}

// Row weights w_r of the reduced loss for grad_loss g: none g_r, mean g / n, sum g;
// `valid` masks rows that have positives.
at::Tensor row_weights(const at::Tensor& grad_loss, Reduction reduction, const at::Tensor& valid,
                       at::ScalarType acc) {
  const at::Tensor g = grad_loss.to(acc);
  const at::Tensor mask = valid.to(acc);
  if (reduction == Reduction::None) return g * mask;
  if (reduction == Reduction::Sum) return g * mask;
  return g / at::clamp_min(mask.sum(), 1) * mask;
}

// Summed in double, as on the CPU (Note [Loss rounding]): one row-count-sized
// reduction, negligible next to the loss itself.
at::Tensor reduce(const at::Tensor& row_loss, Reduction reduction, const at::Tensor& valid) {
  if (reduction == Reduction::None) return row_loss;
  const at::Tensor total = row_loss.sum(at::kDouble);
  if (reduction == Reduction::Sum) return total.to(row_loss.scalar_type());
  return (total / at::clamp_min(valid.sum(), 1)).to(row_loss.scalar_type());
}

// ---- The GEMM route (contrastive_gemm.h; Note [Contrastive routes]) ---------------------

// The rows the GEMMs multiply: x / denom in x's dtype (x itself without normalisation).
at::Tensor normalized_rows(const at::Tensor& x, const at::Tensor& denom, bool normalize) {
  if (!normalize) return x;
  return (x.to(denom.scalar_type()) / denom.unsqueeze(1)).to(x.scalar_type());
}

// ---- Symmetric: NT-Xent, multi-view, SupCon -----------------------------------------

struct SymSaved {
  at::Tensor lse, positive_sum, positive_count;
  at::Tensor lse_positive;  // log-sum-exp form; else empty
  at::Tensor row_loss;      // GEMM route: each row's loss, rounded as on the CPU
};

// The anchor rows [begin, end) of z: all rows in one process, this process's
// rows when z is gathered from several.
struct Anchors {
  int64_t begin, end;
  int64_t count() const { return end - begin; }
};

template <typename T>
GemmLossSpec<T> sym_gemm_spec(const at::Tensor& z_hat, const at::Tensor& labels, Anchors anchors, double scale,
                              bool normalize, PositiveReduction form) {
  GemmLossSpec<T> spec;
  spec.q_hat = z_hat.narrow(0, anchors.begin, anchors.count());
  spec.k_hat = z_hat;
  spec.first_row = anchors.begin;
  spec.labels = data<int64_t>(labels);
  spec.exclude_self = true;
  spec.rows_need_positives = true;
  spec.positives_lse = form == PositiveReduction::kLogSumExp;
  spec.exclude_positives = form == PositiveReduction::kExcluded;
  spec.scale = scale;
  spec.bounded = logit_bound_usable<acc_t<T>>(scale, normalize);
  return spec;
}

// The GEMM route's statistics as the op returns them: rows outside the anchors
// keep 0 (no positives, so no loss and no weight).
template <typename T>
SymSaved sym_saved_from(const GemmLossResult<T>& r, int64_t rows, Anchors anchors) {
  SymSaved s{at::zeros({rows}, r.lse.options()), at::zeros({rows}, r.lse.options()),
             at::zeros({rows}, r.positive_count.options())};
  s.lse.narrow(0, anchors.begin, anchors.count()).copy_(r.lse);
  s.positive_sum.narrow(0, anchors.begin, anchors.count()).copy_(r.positive_sum);
  s.positive_count.narrow(0, anchors.begin, anchors.count()).copy_(r.positive_count);
  s.lse_positive = at::zeros({r.lse_positive.defined() ? rows : 0}, r.lse.options());
  if (r.lse_positive.defined()) s.lse_positive.narrow(0, anchors.begin, anchors.count()).copy_(r.lse_positive);
  s.row_loss = at::zeros({rows}, r.lse.options());
  s.row_loss.narrow(0, anchors.begin, anchors.count()).copy_(r.row_loss);
  return s;
}

// 1 / |P(r)| per row, 0 for rows without positives (count in the accumulation
// type); in the log-sum-exp form 1 for one positive, else 0 (the GEMM merge
// kernel's rule).
at::Tensor inverse_counts(const at::Tensor& count, bool positives_lse = false) {
  if (positives_lse) return (count == 1).to(count.scalar_type()).contiguous();
  return at::where(count > 0, 1 / at::clamp_min(count, 1), at::zeros_like(count)).contiguous();
}

// d z_hat = (G + G^T) z_hat: d K_hat over every row, plus d Q_hat at the anchors.
template <typename T>
at::Tensor sym_gemm_grad_hat(GemmLossResult<T>& r, Anchors anchors) {
  if (r.grad_k_includes_q) return r.grad_k_hat;
  r.grad_k_hat.narrow(0, anchors.begin, anchors.count()).add_(r.grad_q_hat);
  return r.grad_k_hat;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> contrastive_sym_loss(
    const at::Tensor& z_in, const at::Tensor& labels_in, int64_t anchor_begin, int64_t anchor_end, double scale,
    double eps, bool normalize, int64_t reduction_in, bool compute_grad, int64_t positives) {
  check_sym_contrastive_args(z_in, labels_in, anchor_begin, anchor_end, scale, eps, reduction_in, positives);
  const auto form = static_cast<PositiveReduction>(positives);
  const bool positives_lse = form == PositiveReduction::kLogSumExp;
  const DeviceGuard guard(z_in.device());
  const cudaStream_t stream = current_stream(z_in.device());
  const at::Tensor z = z_in.contiguous(), labels = labels_in.contiguous();
  const auto reduction = static_cast<Reduction>(reduction_in);
  const Anchors anchors{anchor_begin, anchor_end};
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> result;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "contrastive_sym_loss", [&] {
    const at::Tensor denom = row_denoms<scalar_t>(z, eps, normalize, stream);
    const bool with_grad = compute_grad && reduction != Reduction::None;
    GemmLossSpec<scalar_t> spec = sym_gemm_spec<scalar_t>(normalized_rows(z, denom, normalize), labels, anchors,
                                                          scale, normalize, form);
    spec.grad_q = spec.grad_k = with_grad;  // weights: 1 where the row has positives
    GemmLossResult<scalar_t> r = gemm_contrastive(spec, z.device(), stream);
    const SymSaved s = sym_saved_from(r, z.size(0), anchors);
    const at::Tensor valid = s.positive_count > 0;
    at::Tensor grad = at::empty({0}, z.options());
    if (with_grad) {
      at::Tensor grad_hat = sym_gemm_grad_hat(r, anchors);
      if (reduction == Reduction::Mean) grad_hat.div_(at::clamp_min(valid.sum(), 1));
      grad = finish_rows<scalar_t>(z, denom, &grad_hat, nullptr, nullptr, nullptr, eps, normalize, stream);
    }
    const at::Tensor lse_positive = positives_lse ? s.lse_positive : at::empty({0}, s.lse.options());
    result = {reduce(s.row_loss, reduction, valid), s.lse, s.positive_count, grad, lse_positive};
  });
  return result;
}

at::Tensor contrastive_sym_backward(const at::Tensor& grad_loss, const at::Tensor& z_in, const at::Tensor& labels_in,
                                    int64_t anchor_begin, int64_t anchor_end, const at::Tensor& lse,
                                    const at::Tensor& positive_count, double scale, double eps, bool normalize,
                                    int64_t reduction, const std::optional<at::Tensor>& lse_positive,
                                    int64_t positives) {
  check_sym_contrastive_args(z_in, labels_in, anchor_begin, anchor_end, scale, eps, reduction, positives);
  check_sym_lse_positive(z_in, lse_positive, positives);
  const auto form = static_cast<PositiveReduction>(positives);
  const bool positives_lse = form == PositiveReduction::kLogSumExp;
  const DeviceGuard guard(z_in.device());
  const cudaStream_t stream = current_stream(z_in.device());
  const at::Tensor z = z_in.contiguous(), labels = labels_in.contiguous();
  at::Tensor grad;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "contrastive_sym_backward", [&] {
    const at::Tensor denom = row_denoms<scalar_t>(z, eps, normalize, stream);
    const at::Tensor lse_acc = lse.to(denom.scalar_type()).contiguous();
    const at::Tensor weight =
        row_weights(grad_loss, static_cast<Reduction>(reduction), positive_count > 0, denom.scalar_type());
    const Anchors anchors{anchor_begin, anchor_end};
    GemmLossSpec<scalar_t> spec = sym_gemm_spec<scalar_t>(normalized_rows(z, denom, normalize), labels, anchors,
                                                          scale, normalize, form);
    const at::Tensor count = positive_count.narrow(0, anchors.begin, anchors.count()).to(lse_acc.scalar_type());
    spec.given_lse = lse_acc.narrow(0, anchors.begin, anchors.count()).contiguous();
    spec.given_weight = weight.narrow(0, anchors.begin, anchors.count()).contiguous();
    spec.given_inv_count = inverse_counts(count, positives_lse);
    if (positives_lse) {
      spec.given_lse_positive =
          lse_positive->to(lse_acc.scalar_type()).narrow(0, anchors.begin, anchors.count()).contiguous();
    }
    spec.grad_q = spec.grad_k = true;
    GemmLossResult<scalar_t> r = gemm_contrastive(spec, z.device(), stream);
    at::Tensor grad_hat = sym_gemm_grad_hat(r, anchors);
    grad = finish_rows<scalar_t>(z, denom, &grad_hat, nullptr, nullptr, nullptr, eps, normalize, stream);
  });
  return grad;
}

// ---- Asymmetric: InfoNCE (MoCo, MoCo v3, CLIP) --------------------------------------

template <typename T>
struct AsymInputs {
  at::Tensor q, k, p, denom_q, denom_k, denom_p, positive_logit;
  int64_t offset = 0;  // without p: the positive of query r is key r + offset
};

template <typename T>
AsymInputs<T> asym_inputs(const at::Tensor& query, const at::Tensor& key, const std::optional<at::Tensor>& positive,
                          int64_t offset, double scale, double eps, bool normalize, cudaStream_t stream) {
  using A = acc_t<T>;
  AsymInputs<T> in;
  in.offset = SSL_OPS_PLANTED(kPositiveOffByOne) ? offset + 1 : offset;
  in.q = query.contiguous();
  // A MoCo queue kept as (D, K) arrives transposed: the GEMM route reads it in
  // place when nothing normalises it (solo-learn's mocov2plus), never copying it.
  const bool column_major = key.dim() == 2 && key.t().is_contiguous();
  in.k = (!normalize && column_major) ? key : key.contiguous();
  in.denom_q = row_denoms<T>(in.q, eps, normalize, stream);
  in.denom_k = row_denoms<T>(in.k, eps, normalize, stream);
  in.positive_logit = at::empty({in.q.size(0)}, in.denom_q.options());
  if (positive.has_value()) {
    in.p = positive->contiguous();
    in.denom_p = row_denoms<T>(in.p, eps, normalize, stream);
    RowDotParams<T> d{data<T>(in.q), data<T>(in.p), data<A>(in.denom_q), data<A>(in.denom_p), in.q.size(0),
                      in.q.size(1), static_cast<A>(scale), mutable_data<A>(in.positive_logit)};
    launch_kernel(row_dot_kernel<T>, row_grid(in.q.size(0)), dim3(kRowThreads), 0, stream, d);
  }
  return in;
}

// The asymmetric gradients through the normalisation, from d q_hat and d k_hat
// (accumulation type; undefined where not asked for) and, with a positive key,
// its softmax term coef_r = scale * w_r (softmax of the positive key - 1).
template <typename T>
std::array<at::Tensor, 3> finish_asym(const AsymInputs<T>& in, const at::Tensor& grad_q_hat,
                                      const at::Tensor& grad_k_hat, const at::Tensor& lse, const at::Tensor& weight,
                                      double scale, double eps, bool normalize, std::array<bool, 3> mask,
                                      cudaStream_t stream) {
  const bool with_p = in.p.defined();
  at::Tensor coef;
  if (with_p) coef = (weight * (at::exp(in.positive_logit - lse) - 1) * scale).contiguous();
  std::array<at::Tensor, 3> out;
  if (mask[0]) {
    out[0] = with_p ? finish_rows<T>(in.q, in.denom_q, &grad_q_hat, &coef, &in.p, &in.denom_p, eps, normalize,
                                     stream)
                    : finish_rows<T>(in.q, in.denom_q, &grad_q_hat, nullptr, nullptr, nullptr, eps, normalize,
                                     stream);
  }
  if (mask[1]) out[1] = finish_rows<T>(in.k, in.denom_k, &grad_k_hat, nullptr, nullptr, nullptr, eps, normalize, stream);
  if (mask[2] && with_p) {
    out[2] = finish_rows<T>(in.p, in.denom_p, nullptr, &coef, &in.q, &in.denom_q, eps, normalize, stream);
  }
  return out;
}

// The GEMM route of both asymmetric ops: queries against keys (or the queue),
// the positive a separate key (MoCo; its logit starts each row) or key
// r + offset. `lse` given (the backward op): only the gradient is formed.
// Returns the log-sum-exps (forward) and the gradients `mask` asks for.
template <typename T>
std::pair<at::Tensor, std::array<at::Tensor, 3>> asym_gemm(AsymInputs<T>& in, const at::Tensor& given_lse,
                                                          const at::Tensor& weight, double scale, double eps,
                                                          bool normalize, std::array<bool, 3> mask,
                                                          cudaStream_t stream) {
  const bool with_p = in.p.defined();
  GemmLossSpec<T> spec;
  spec.q_hat = normalized_rows(in.q, in.denom_q, normalize);
  spec.k_hat = normalized_rows(in.k, in.denom_k, normalize);
  spec.offset_positive = !with_p;
  spec.positive_offset = in.offset;
  if (with_p) spec.initial_logit = in.positive_logit;
  spec.scale = scale;
  spec.bounded = logit_bound_usable<acc_t<T>>(scale, normalize);
  spec.grad_q = weight.defined() && mask[0];
  spec.grad_k = weight.defined() && mask[1];
  if (given_lse.defined()) {
    spec.given_lse = given_lse;
    spec.given_weight = weight;
    spec.given_inv_count = at::ones_like(given_lse);  // one positive per row (unused with a positive key)
  } else {
    spec.weight = weight;
  }
  GemmLossResult<T> r = gemm_contrastive(spec, in.q.device(), stream);
  const at::Tensor lse = given_lse.defined() ? given_lse : r.lse;
  if (!with_p && r.positive_sum.defined()) in.positive_logit = r.positive_sum;  // S_r,r+offset
  if (!weight.defined()) return {lse, {}};
  return {lse, finish_asym<T>(in, r.grad_q_hat, r.grad_k_hat, lse, weight, scale, eps, normalize, mask, stream)};
}

at::Tensor or_empty(const at::Tensor& t, const at::Tensor& like) {
  return t.defined() ? t : at::empty({0}, like.options());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> contrastive_asym_loss(
    const at::Tensor& query, const at::Tensor& key, const std::optional<at::Tensor>& positive_key,
    int64_t positive_offset, double scale, double eps, bool normalize, int64_t reduction_in,
    std::array<bool, 3> grad_mask) {
  check_asym_contrastive_args(query, key, positive_key, positive_offset, scale, eps, reduction_in);
  const DeviceGuard guard(query.device());
  const cudaStream_t stream = current_stream(query.device());
  const auto reduction = static_cast<Reduction>(reduction_in);
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> result;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, query.scalar_type(), "contrastive_asym_loss", [&] {
    AsymInputs<scalar_t> in =
        asym_inputs<scalar_t>(query, key, positive_key, positive_offset, scale, eps, normalize, stream);
    const at::Tensor all_rows = at::ones({in.q.size(0)}, in.denom_q.options().dtype(at::kBool));
    at::Tensor weight;  // undefined: no gradient
    if (reduction != Reduction::None && (grad_mask[0] || grad_mask[1] || grad_mask[2])) {
      weight = row_weights(at::ones({}, in.denom_q.options()), reduction, all_rows, in.denom_q.scalar_type());
    }
    auto [lse, grads] = asym_gemm<scalar_t>(in, at::Tensor(), weight, scale, eps, normalize, grad_mask, stream);
    result = {reduce(lse - in.positive_logit, reduction, all_rows), lse, or_empty(grads[0], query),
              or_empty(grads[1], key), or_empty(grads[2], query)};
  });
  return result;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> contrastive_asym_backward(
    const at::Tensor& grad_loss, const at::Tensor& query, const at::Tensor& key,
    const std::optional<at::Tensor>& positive_key, int64_t positive_offset, const at::Tensor& lse, double scale,
    double eps, bool normalize, int64_t reduction, std::array<bool, 3> grad_mask) {
  check_asym_contrastive_args(query, key, positive_key, positive_offset, scale, eps, reduction);
  const DeviceGuard guard(query.device());
  const cudaStream_t stream = current_stream(query.device());
  std::tuple<at::Tensor, at::Tensor, at::Tensor> result;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, query.scalar_type(), "contrastive_asym_backward", [&] {
    AsymInputs<scalar_t> in =
        asym_inputs<scalar_t>(query, key, positive_key, positive_offset, scale, eps, normalize, stream);
    const at::Tensor lse_acc = lse.to(in.denom_q.scalar_type()).contiguous();
    const at::Tensor all_rows = at::ones_like(lse_acc, lse_acc.options().dtype(at::kBool));
    const at::Tensor weight =
        row_weights(grad_loss, static_cast<Reduction>(reduction), all_rows, lse_acc.scalar_type()).contiguous();
    const auto grads = asym_gemm<scalar_t>(in, lse_acc, weight, scale, eps, normalize, grad_mask, stream).second;
    result = {or_empty(grads[0], query), or_empty(grads[1], key), or_empty(grads[2], query)};
  });
  return result;
}

}  // namespace

SSL_OPS_CUDA_LIBRARY_IMPL(m) {
  m.impl("contrastive_sym_loss", &contrastive_sym_loss);
  m.impl("contrastive_sym_backward", &contrastive_sym_backward);
  m.impl("contrastive_asym_loss", &contrastive_asym_loss);
  m.impl("contrastive_asym_backward", &contrastive_asym_backward);
}

}  // namespace ssl_ops::cuda
