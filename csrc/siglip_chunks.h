#pragma once
// The SigLIP loss (Note [SigLIP loss], siglip_check.h) in chunks of image
// rows, the host side shared by the backends: each chunk's (c x M)
// similarities from the vendor GEMM (at::mm), the backend's fused elementwise
// pass for the loss and the logits' gradient G, then two more GEMMs for the
// feature gradients. No buffer is ever N x M: S (then G over it) holds c x M
// elements, c set by the caller's chunk budget.
//
// Numerics: S in the accumulation type (float32 for half inputs, float64 for
// float64); the passes form softplus and sigmoid from e = exp(-|t|), stable
// for any |logit| (SigLIP's ~100 included); the loss, d scale and d bias are
// summed in double. The elementwise pass and the GEMMs are the backend's
// (chunk_gemms.h): on the CPU one fused loop per row (csrc/cpu/siglip.cpp)
// and features widened to the accumulation type; on CUDA one fused row kernel
// (csrc/cuda/siglip.cu) and fp16/bf16 features kept as they are, so the GEMMs
// run on the tensor cores with fp32 accumulation: S in fp32, and G written by
// the row kernel in the features' dtype times kHalfGScale.
#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>

#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdlib>
#include <optional>
#include <tuple>

#include "chunk_gemms.h"
#include "message.h"

namespace ssl_ops {

// SSL_OPS_SIGLIP_CHUNK_ELEMENTS, when set, replaces a backend's default chunk
// budget (tests force many chunks with it).
inline int64_t siglip_chunk_elements(int64_t default_elements) {
  const char* value = std::getenv("SSL_OPS_SIGLIP_CHUNK_ELEMENTS");
  if (value == nullptr || *value == '\0') return default_elements;
  char* end = nullptr;
  const long long parsed = std::strtoll(value, &end, 10);
  TORCH_CHECK(end != value && *end == '\0' && parsed > 0,
              ssl_ops::message("SSL_OPS_SIGLIP_CHUNK_ELEMENTS must be a positive integer, got \"", value, "\""));
  return parsed;
}

using SiglipOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// One chunk's elementwise pass: from the similarities s (c x M, accumulation
// type; the positives on its diagonal `positive_diagonal`) the sums of the
// pairs' losses, of g * s and of g (0-dim double tensors), and with
// compute_grad G itself, g = d loss / d logit without the 1 / N: written over
// s, or (half features on a backend whose GEMMs take them) into g_half,
// rounded to the features' dtype, times kHalfGScale.
struct SiglipChunkSums {
  at::Tensor loss, grad_scale, grad_bias, g;
};

// loss (float32; float64 for float64 features), then with compute_grad the
// gradients of x, y (their dtype), scale and bias (theirs; bias's empty
// without a bias); otherwise empty tensors. chunk_pass: the backend's fused
// elementwise pass (SiglipChunkSums), with the signature
// (s, positive_diagonal, scale, bias, compute_grad, g_half) (g_half undefined:
// G over s).
template <typename ChunkPass>
SiglipOutputs siglip_loss_chunked(const at::Tensor& x_in, const at::Tensor& y_in, const at::Tensor& scale_in,
                                  const std::optional<at::Tensor>& bias_in, int64_t positive_offset,
                                  bool compute_grad, int64_t chunk_elements, ChunkPass chunk_pass,
                                  const ChunkGemms& gemms) {
  const at::ScalarType acc = x_in.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const bool half = gemms_take_half(gemms, x_in);
  const at::Tensor x = (half ? x_in : x_in.to(acc)).contiguous(), y = (half ? y_in : y_in.to(acc)).contiguous();
  const auto acc_opts = x.options().dtype(acc);
  const int64_t n = x.size(0), m = y.size(0);
  const at::Tensor scale = scale_in.reshape({}).to(acc);
  const bool has_bias = bias_in.has_value() && bias_in->defined();
  const at::Tensor bias = has_bias ? bias_in->reshape({}).to(acc) : at::Tensor();
  const int64_t rows_per_chunk = std::clamp<int64_t>(chunk_elements / std::max<int64_t>(m, 1), 1, n);

  const auto double_opts = x.options().dtype(at::kDouble);
  at::Tensor loss = at::zeros({}, double_opts);
  at::Tensor grad_scale = at::zeros({}, double_opts), grad_bias = at::zeros({}, double_opts);
  at::Tensor grad_x = compute_grad ? at::empty({n, x.size(1)}, acc_opts) : at::Tensor();
  at::Tensor grad_y = compute_grad ? at::zeros({m, y.size(1)}, acc_opts) : at::Tensor();
  const at::Tensor y_t = y.t();
  // One S buffer (and with half operands one G buffer) for every chunk: no
  // allocation per chunk.
  at::Tensor s_buffer = at::empty({rows_per_chunk, m}, acc_opts);
  at::Tensor g_buffer = half && compute_grad ? at::empty({rows_per_chunk, m}, x.options()) : at::Tensor();
  for (int64_t r0 = 0; r0 < n; r0 += rows_per_chunk) {
    const int64_t c = std::min(rows_per_chunk, n - r0);
    const at::Tensor x_chunk = x.narrow(0, r0, c);
    at::Tensor s = s_buffer.narrow(0, 0, c);
    gemms.mm(s, x_chunk, y_t);
    // The positives of the chunk's rows are its diagonal r0 + positive_offset.
    const at::Tensor g_half = g_buffer.defined() ? g_buffer.narrow(0, 0, c) : at::Tensor();
    const SiglipChunkSums sums = chunk_pass(s, r0 + positive_offset, scale, bias, compute_grad, g_half);
    loss.add_(sums.loss);
    if (!compute_grad) continue;
    grad_bias.add_(sums.grad_bias);
    grad_scale.add_(sums.grad_scale);
    at::Tensor grad_x_rows = grad_x.narrow(0, r0, c);
    gemms.mm(grad_x_rows, sums.g, y);
    gemms.addmm(grad_y, sums.g.t(), x_chunk);
  }
  const at::ScalarType loss_type = acc;
  const double inv_n = 1.0 / static_cast<double>(n);
  at::Tensor loss_out = (loss * inv_n).to(loss_type);
  if (!compute_grad) {  // distinct empty outputs: outputs may not alias
    const auto opts = x_in.options();
    return {loss_out, at::empty({0}, opts), at::empty({0}, opts), at::empty({0}, opts), at::empty({0}, opts)};
  }
  // The feature gradients carry scale / N (and G's 1 / kHalfGScale in half);
  // d scale and d bias 1 / N.
  const at::Tensor feature_factor = scale * (half ? inv_n / kHalfGScale : inv_n);
  grad_x.mul_(feature_factor);
  grad_y.mul_(feature_factor);
  at::Tensor out_scale = (grad_scale * inv_n).to(scale_in.scalar_type()).reshape(scale_in.sizes());
  at::Tensor out_bias = has_bias ? (grad_bias * inv_n).to(bias_in->scalar_type()).reshape(bias_in->sizes())
                                 : at::empty({0}, x_in.options());
  return {loss_out, grad_x.to(x_in.scalar_type()), grad_y.to(y_in.scalar_type()), out_scale, out_bias};
}

}  // namespace ssl_ops
