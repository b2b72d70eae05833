#pragma once
// The symmetric in-batch InfoNCE (Note [Symmetric InfoNCE], clip_check.h) in
// chunks of query rows, the host side shared by the backends
// (csrc/cpu/contrastive_clip.cpp, csrc/cuda/contrastive_clip.cu): each chunk's
// similarities s (c x B, unscaled) from the backend's GEMM, then its passes:
//   passes.stats(s, r0, scale, row_lse, diag, col_max, col_sum)
//     the chunk's rows' log-sum-exps and s_ii (c each), and the columns'
//     running maximum and sum of exp(S - maximum) (B each) merged with the
//     chunk's (the first chunk starts them: r0 == 0);
//   passes.coefficients(s, r0, scale, row_lse, col_lse, g_half)
//     G = P + Q - 2 [i == j] for the chunk, over s (or into g_half, the
//     features' dtype times kHalfGScale), and sum_ij G_ij s_ij as a 0-dim
//     double tensor.
// The chunk: chunk_elements / B rows (all of S where it fits; then S is kept
// from the statistics for the gradient: one GEMM fewer).
// Numerics: S, the statistics and G in the accumulation type (float32, or
// float64 for float64 features); the loss and d scale summed in double.
#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/log.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <tuple>

#include "chunk_gemms.h"

namespace ssl_ops {

// loss, grad_query, grad_key, grad_scale (the last three empty without compute_grad).
using ClipOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

template <typename Passes>
ClipOutputs clip_loss_chunked(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& scale_in,
                              int64_t reduction, bool compute_grad, int64_t chunk_elements,
                              const ChunkGemms& gemms, Passes& passes) {
  const at::ScalarType acc = q_in.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const bool half = gemms_take_half(gemms, q_in);
  const at::Tensor q = (half ? q_in : q_in.to(acc)).contiguous(), k = (half ? k_in : k_in.to(acc)).contiguous();
  const auto acc_opts = q.options().dtype(acc);
  const int64_t b = q.size(0), d = q.size(1);
  const at::Tensor scale = scale_in.reshape({}).to(acc);
  const int64_t rows_per_chunk = std::clamp<int64_t>(chunk_elements / b, 1, b);

  at::Tensor row_lse = at::empty({b}, acc_opts), diag = at::empty({b}, acc_opts);
  at::Tensor col_max = at::empty({b}, acc_opts), col_sum = at::empty({b}, acc_opts);
  at::Tensor s_buffer = at::empty({rows_per_chunk, b}, acc_opts);
  const at::Tensor k_t = k.t();
  for (int64_t r0 = 0; r0 < b; r0 += rows_per_chunk) {
    const int64_t c = std::min(rows_per_chunk, b - r0);
    at::Tensor s = s_buffer.narrow(0, 0, c);
    gemms.mm(s, q.narrow(0, r0, c), k_t);
    passes.stats(s, r0, scale, row_lse.narrow(0, r0, c), diag.narrow(0, r0, c), col_max, col_sum);
  }
  const at::Tensor col_lse = col_max + at::log(col_sum);
  const double factor = (reduction == 1 ? 0.5 / static_cast<double>(b) : 0.5);
  const at::Tensor total =
      row_lse.sum(at::kDouble) + col_lse.sum(at::kDouble) - 2 * scale.to(at::kDouble) * diag.sum(at::kDouble);
  at::Tensor loss = (total * factor).to(acc);
  if (!compute_grad) {  // distinct empty outputs: outputs may not alias
    const auto opts = q_in.options();
    return {loss, at::empty({0}, opts), at::empty({0}, opts), at::empty({0}, opts)};
  }

  at::Tensor grad_q = at::empty({b, d}, acc_opts), grad_k = at::zeros({b, d}, acc_opts);
  at::Tensor grad_scale = at::zeros({}, acc_opts.dtype(at::kDouble));
  at::Tensor g_buffer = half ? at::empty({rows_per_chunk, b}, q.options()) : at::Tensor();
  const bool s_kept = rows_per_chunk == b;  // the statistics' S is the gradient's
  for (int64_t r0 = 0; r0 < b; r0 += rows_per_chunk) {
    const int64_t c = std::min(rows_per_chunk, b - r0);
    const at::Tensor q_chunk = q.narrow(0, r0, c);
    at::Tensor s = s_buffer.narrow(0, 0, c);
    if (!s_kept) gemms.mm(s, q_chunk, k_t);
    const at::Tensor g_half = half ? g_buffer.narrow(0, 0, c) : at::Tensor();
    const auto [g, g_dot_s] = passes.coefficients(s, r0, scale, row_lse.narrow(0, r0, c), col_lse, g_half);
    grad_scale.add_(g_dot_s);
    at::Tensor grad_q_rows = grad_q.narrow(0, r0, c);
    gemms.mm(grad_q_rows, g, k);
    gemms.addmm(grad_k, g.t(), q_chunk);
  }
  const at::Tensor feature_factor = scale * (half ? factor / kHalfGScale : factor);
  grad_q.mul_(feature_factor);
  grad_k.mul_(feature_factor);
  at::Tensor out_scale = (grad_scale * factor).to(scale_in.scalar_type()).reshape(scale_in.sizes());
  return {loss, grad_q.to(q_in.scalar_type()), grad_k.to(k_in.scalar_type()), out_scale};
}

}  // namespace ssl_ops
