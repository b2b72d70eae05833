#pragma once
// The reduction argument of the contrastive backward ops on CUDA, as small
// ATen ops on the device (nothing waits for the GPU): each row's weight in the
// gradient. The forward ops reduce their loss in one kernel (loss_reduction.cuh).
#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/clamp_min.h>

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

}  // namespace ssl_ops::cuda
