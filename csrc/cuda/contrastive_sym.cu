// NT-Xent, multi-view NT-Xent, SupCon and DCL (the symmetric contrastive op),
// CUDA host code. The math is csrc/cpu/contrastive_sym.cpp's (Note [Contrastive
// algorithm], csrc/contrastive_check.h): the rows normalised, the loss stated as
// a ContrastiveSpec with Q = the anchor rows of z and K = z, the statistics and
// d z_hat = (G + G^T) z_hat from contrastive_passes (contrastive_passes.h), and
// the gradient taken back through the normalisation.
#include <ATen/Dispatch.h>
#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/clamp_min.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "../contrastive_check.h"
#include "compat.cuh"
#include "contrastive_passes.h"
#include "loss_reduction.cuh"
#include "row_norms.cuh"

namespace ssl_ops::cuda {
namespace {

struct SymSaved {
  at::Tensor lse, positive_sum, positive_count;
  at::Tensor lse_positive;  // log-sum-exp form; else empty
  at::Tensor row_loss;      // each row's loss, rounded as on the CPU
};

// The anchor rows [begin, end) of z: all rows in one process, this process's
// rows when z is gathered from several.
struct Anchors {
  int64_t begin, end;
  int64_t count() const { return end - begin; }
};

template <typename T>
ContrastiveSpec<T> sym_spec(const at::Tensor& z_hat, const at::Tensor& labels, Anchors anchors, double scale,
                              bool normalize, PositiveReduction form) {
  ContrastiveSpec<T> spec;
  spec.q_hat = z_hat.narrow(0, anchors.begin, anchors.count());
  spec.k_hat = z_hat;
  spec.first_row = anchors.begin;
  spec.labels = labels.const_data_ptr<int64_t>();
  spec.exclude_self = true;
  spec.rows_need_positives = true;
  spec.positives_lse = form == PositiveReduction::kLogSumExp;
  spec.exclude_positives = form == PositiveReduction::kExcluded;
  spec.scale = scale;
  spec.bounded = logit_bound_usable<acc_t<T>>(scale, normalize);
  return spec;
}

// The statistics as the op returns them: rows outside the anchors
// keep 0 (no positives, so no loss and no weight).
template <typename T>
SymSaved sym_saved_from(const ContrastiveResult<T>& r, int64_t rows, Anchors anchors) {
  if (anchors.begin == 0 && anchors.end == rows) {  // every row an anchor: no copies (ten launches fewer)
    const at::Tensor none = at::empty({0}, r.lse.options());
    return {r.lse, r.positive_sum, r.positive_count, r.lse_positive.defined() ? r.lse_positive : none, r.row_loss};
  }
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
at::Tensor sym_grad_hat(ContrastiveResult<T>& r, Anchors anchors) {
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
    const auto [denom, z_hat] = normalized_rows<scalar_t>(z, eps, normalize, stream);
    const bool with_grad = compute_grad && reduction != Reduction::None;
    ContrastiveSpec<scalar_t> spec = sym_spec<scalar_t>(z_hat, labels, anchors, scale, normalize, form);
    spec.grad_q = spec.grad_k = with_grad;  // weights: 1 where the row has positives
    ContrastiveResult<scalar_t> r = contrastive_passes(spec, z.device(), stream);
    const SymSaved s = sym_saved_from(r, z.size(0), anchors);
    at::Tensor loss = s.row_loss, grad = at::empty({0}, z.options());
    if (reduction != Reduction::None) {
      // The mean over the rows with positives, or the sum; each such row's
      // gradient weighs 1 / count or 1.
      const ReducedLoss reduced = reduced_loss<acc_t<scalar_t>>(s.row_loss, nullptr, &s.positive_count,
                                                                reduction == Reduction::Mean, stream);
      loss = reduced.loss;
      if (with_grad) {
        const at::Tensor grad_hat = sym_grad_hat(r, anchors);
        grad = finish_rows<scalar_t>(z, denom, &grad_hat, nullptr, nullptr, nullptr, eps, normalize, stream,
                                     &reduced.row_factor);
      }
    }
    const at::Tensor lse_positive = positives_lse ? s.lse_positive : at::empty({0}, s.lse.options());
    result = {loss, s.lse, s.positive_count, grad, lse_positive};
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
    const auto [denom, z_hat] = normalized_rows<scalar_t>(z, eps, normalize, stream);
    const at::Tensor lse_acc = lse.to(denom.scalar_type()).contiguous();
    const at::Tensor weight =
        row_weights(grad_loss, static_cast<Reduction>(reduction), positive_count > 0, denom.scalar_type());
    const Anchors anchors{anchor_begin, anchor_end};
    ContrastiveSpec<scalar_t> spec = sym_spec<scalar_t>(z_hat, labels, anchors, scale, normalize, form);
    const at::Tensor count = positive_count.narrow(0, anchors.begin, anchors.count()).to(lse_acc.scalar_type());
    spec.given_lse = lse_acc.narrow(0, anchors.begin, anchors.count()).contiguous();
    spec.given_weight = weight.narrow(0, anchors.begin, anchors.count()).contiguous();
    spec.given_inv_count = inverse_counts(count, positives_lse);
    if (positives_lse) {
      spec.given_lse_positive =
          lse_positive->to(lse_acc.scalar_type()).narrow(0, anchors.begin, anchors.count()).contiguous();
    }
    spec.grad_q = spec.grad_k = true;
    ContrastiveResult<scalar_t> r = contrastive_passes(spec, z.device(), stream);
    at::Tensor grad_hat = sym_grad_hat(r, anchors);
    grad = finish_rows<scalar_t>(z, denom, &grad_hat, nullptr, nullptr, nullptr, eps, normalize, stream);
  });
  return grad;
}

}  // namespace

SSL_OPS_CUDA_LIBRARY_IMPL(m) {
  m.impl("contrastive_sym_loss", &contrastive_sym_loss);
  m.impl("contrastive_sym_backward", &contrastive_sym_backward);
}

}  // namespace ssl_ops::cuda
