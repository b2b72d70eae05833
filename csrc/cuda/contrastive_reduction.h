#pragma once
// The reduction argument of both contrastive ops on CUDA, as small ATen ops on
// the device (nothing waits for the GPU): the loss from the rows' losses, and
// each row's weight in the gradient.
#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/clamp_min.h>
#include <ATen/ops/sum.h>

#include "../contrastive_check.h"

namespace ssl_ops::cuda {

// Row weights w_r of the reduced loss for grad_loss g: none g_r, mean g / n, sum g;
// `valid` masks rows that have positives.
inline at::Tensor row_weights(const at::Tensor& grad_loss, Reduction reduction, const at::Tensor& valid,
                              at::ScalarType acc) {
  const at::Tensor g = grad_loss.to(acc);
  const at::Tensor mask = valid.to(acc);
  if (reduction == Reduction::Mean) return g / at::clamp_min(mask.sum(), 1) * mask;
  return g * mask;
}

// Summed in double, as on the CPU (Note [Loss rounding]): one row-count-sized
// reduction, negligible next to the loss itself.
inline at::Tensor reduce(const at::Tensor& row_loss, Reduction reduction, const at::Tensor& valid) {
  if (reduction == Reduction::None) return row_loss;
  const at::Tensor total = row_loss.sum(at::kDouble);
  if (reduction == Reduction::Sum) return total.to(row_loss.scalar_type());
  return (total / at::clamp_min(valid.sum(), 1)).to(row_loss.scalar_type());
}

}  // namespace ssl_ops::cuda
