#pragma once
// The cosine-matrix backward's rank-one case, shared by the CPU and CUDA
// kernels (plain ATen ops, so either backend runs it on its own tensors).
//
// An upstream gradient broadcast along a dimension (from out.sum(), out.mean(),
// or a per-row or per-column weight) is rank one, dC = u v^T, so dC . X =
// u (v^T X) costs O((M + N) D) instead of a GEMM, and no dense copy of dC is
// made (on a GPU at 16384^2 that copy alone is 1 GB in fp32).
#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/mv.h>
#include <ATen/ops/ones.h>

#include <optional>

namespace ssl_ops {

struct RankOne {
  at::Tensor u, v;  // (M,), (N,), in the compute type
};

inline std::optional<RankOne> rank_one(const at::Tensor& grad, at::ScalarType compute) {
  if (grad.numel() == 0) return std::nullopt;
  const auto options = grad.options().dtype(compute);
  if (grad.stride(1) == 0) return RankOne{grad.select(1, 0).to(compute), at::ones({grad.size(1)}, options)};
  if (grad.stride(0) == 0) return RankOne{at::ones({grad.size(0)}, options), grad.select(0, 0).to(compute)};
  return std::nullopt;
}

// outer(left, right^T rows): row i is left_i * (right . rows).
inline at::Tensor rank_one_product(const at::Tensor& left, const at::Tensor& right, const at::Tensor& rows) {
  return left.unsqueeze(1) * at::mv(rows.t(), right).unsqueeze(0);
}

}  // namespace ssl_ops
