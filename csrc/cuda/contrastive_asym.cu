// InfoNCE for MoCo, MoCo v3 and CLIP (the asymmetric contrastive op), CUDA
// host code. The math is csrc/cpu/contrastive_asym.cpp's (Note [Contrastive
// algorithm], csrc/contrastive_check.h): queries against keys or the queue,
// the positive key r + offset or MoCo's separate positive key (its logit the
// first term of each row), the statistics and d q_hat, d k_hat from
// contrastive_passes (contrastive_passes.h), and the gradients taken back
// through the normalisation.
#include <ATen/Dispatch.h>
#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/exp.h>
#include <ATen/ops/ones_like.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "../contrastive_check.h"
#include "compat.cuh"
#include "contrastive_passes.h"
#include "loss_reduction.cuh"
#include "row_norms.cuh"

#include <array>
#include <utility>

namespace ssl_ops::cuda {
namespace {

template <typename T>
struct AsymInputs {
  at::Tensor q, k, p, denom_q, denom_k, denom_p, positive_logit;
  at::Tensor q_hat, k_hat;  // the rows the products multiply
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
  NormalizedRows q = normalized_rows<T>(in.q, eps, normalize, stream);
  NormalizedRows k = normalized_rows<T>(in.k, eps, normalize, stream);
  in.denom_q = q.denom, in.q_hat = q.rows;
  in.denom_k = k.denom, in.k_hat = k.rows;
  in.positive_logit = at::empty({in.q.size(0)}, in.denom_q.options());
  if (positive.has_value()) {
    in.p = positive->contiguous();
    in.denom_p = row_denoms<T>(in.p, eps, normalize, stream);
    RowDotParams<T> d{in.q.template const_data_ptr<T>(), in.p.template const_data_ptr<T>(),
                      in.denom_q.template const_data_ptr<A>(), in.denom_p.template const_data_ptr<A>(),
                      in.q.size(0), in.q.size(1), static_cast<A>(scale), in.positive_logit.template data_ptr<A>()};
    launch_kernel(row_dot_kernel<T>, row_grid(in.q.size(0)), dim3(kRowThreads), 0, stream, d);
  }
  return in;
}

// The asymmetric gradients through the normalisation, from d q_hat and d k_hat
// (accumulation type; undefined where not asked for) and, with a positive key,
// its softmax term coef_r = scale * w_r (softmax of the positive key - 1); all
// of it times `scale` (a 0-dim tensor: the mean's 1 / rows), where given.
template <typename T>
std::array<at::Tensor, 3> finish_asym(const AsymInputs<T>& in, const at::Tensor& grad_q_hat,
                                      const at::Tensor& grad_k_hat, const at::Tensor& coef, const at::Tensor* scale,
                                      double eps, bool normalize, std::array<bool, 3> mask, cudaStream_t stream) {
  const bool with_p = in.p.defined();
  std::array<at::Tensor, 3> out;
  if (mask[0]) {
    out[0] = with_p ? finish_rows<T>(in.q, in.denom_q, &grad_q_hat, &coef, &in.p, &in.denom_p, eps, normalize,
                                     stream, scale)
                    : finish_rows<T>(in.q, in.denom_q, &grad_q_hat, nullptr, nullptr, nullptr, eps, normalize,
                                     stream, scale);
  }
  if (mask[1]) {
    out[1] = finish_rows<T>(in.k, in.denom_k, &grad_k_hat, nullptr, nullptr, nullptr, eps, normalize, stream, scale);
  }
  if (mask[2] && with_p) {
    out[2] = finish_rows<T>(in.p, in.denom_p, nullptr, &coef, &in.q, &in.denom_q, eps, normalize, stream, scale);
  }
  return out;
}

// The passes of both asymmetric ops: queries against keys (or the queue),
// the positive a separate key (MoCo; its logit starts each row) or key
// r + offset. The forward (no given_lse) forms the statistics and, with
// `grad`, the gradients for weight 1 per row; the backward op forms the
// gradients for given_weight from given_lse. Positive logits land in
// in.positive_logit.
template <typename T>
ContrastiveResult<T> asym_passes(AsymInputs<T>& in, const at::Tensor& given_lse, const at::Tensor& given_weight,
                                 bool grad, double scale, bool normalize, std::array<bool, 3> mask,
                                 cudaStream_t stream) {
  const bool with_p = in.p.defined();
  ContrastiveSpec<T> spec;
  spec.q_hat = in.q_hat;
  spec.k_hat = in.k_hat;
  spec.offset_positive = !with_p;
  spec.positive_offset = in.offset;
  if (with_p) spec.initial_logit = in.positive_logit;
  spec.scale = scale;
  spec.bounded = logit_bound_usable<acc_t<T>>(scale, normalize);
  spec.grad_q = grad && mask[0];
  spec.grad_k = grad && mask[1];
  if (given_lse.defined()) {
    spec.given_lse = given_lse;
    spec.given_weight = given_weight;
    spec.given_inv_count = at::ones_like(given_lse);  // one positive per row (unused with a positive key)
  }
  ContrastiveResult<T> r = contrastive_passes(spec, in.q.device(), stream);
  if (!with_p && r.positive_sum.defined()) in.positive_logit = r.positive_sum;  // S_r,r+offset
  return r;
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
    const bool grad = reduction != Reduction::None && (grad_mask[0] || grad_mask[1] || grad_mask[2]);
    ContrastiveResult<scalar_t> r =
        asym_passes<scalar_t>(in, at::Tensor(), at::Tensor(), grad, scale, normalize, grad_mask, stream);
    at::Tensor loss;
    std::array<at::Tensor, 3> grads;
    if (reduction == Reduction::None) {
      loss = r.lse - in.positive_logit;
    } else {
      // Every row counts: the mean's 1 / rows weighs each row's gradient.
      const ReducedLoss reduced = reduced_loss<acc_t<scalar_t>>(r.lse, &in.positive_logit, nullptr,
                                                                reduction == Reduction::Mean, stream);
      loss = reduced.loss;
      if (grad) {
        grads = finish_asym<scalar_t>(in, r.grad_q_hat, r.grad_k_hat, r.positive_coef, &reduced.row_factor, eps,
                                      normalize, grad_mask, stream);
      }
    }
    result = {loss, r.lse, or_empty(grads[0], query), or_empty(grads[1], key), or_empty(grads[2], query)};
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
    const ContrastiveResult<scalar_t> r =
        asym_passes<scalar_t>(in, lse_acc, weight, true, scale, normalize, grad_mask, stream);
    at::Tensor coef;
    if (in.p.defined()) coef = (weight * (at::exp(in.positive_logit - lse_acc) - 1) * scale).contiguous();
    const auto grads = finish_asym<scalar_t>(in, r.grad_q_hat, r.grad_k_hat, coef, nullptr, eps, normalize,
                                             grad_mask, stream);
    result = {or_empty(grads[0], query), or_empty(grads[1], key), or_empty(grads[2], query)};
  });
  return result;
}

}  // namespace

SSL_OPS_CUDA_LIBRARY_IMPL(m) {
  m.impl("contrastive_asym_loss", &contrastive_asym_loss);
  m.impl("contrastive_asym_backward", &contrastive_asym_backward);
}

}  // namespace ssl_ops::cuda
