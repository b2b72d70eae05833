#pragma once
// Argument validation shared by the CPU and CUDA row-wise cosine kernels.
#include <ATen/core/Tensor.h>

#include <optional>

namespace ssl_ops {

// Throws unless x0 and x1 are floating (rows, features) matrices of one shape,
// dtype and device, and eps is positive and finite.
void check_cosine_rows_args(const at::Tensor& x0, const at::Tensor& x1, double eps);

// Throws unless a (M, D) and b (N, D), when given, are floating matrices of one
// dtype and device with D >= 1 (M or N may be 0), and eps is positive.
void check_cosine_matrix_args(const at::Tensor& a, const std::optional<at::Tensor>& b, double eps);

}  // namespace ssl_ops
