#pragma once
// Argument validation shared by the CPU and CUDA row-wise cosine kernels.
#include <ATen/core/Tensor.h>

namespace ssl_ops {

// Throws unless x0 and x1 are floating (rows, features) matrices of one shape,
// dtype and device, and eps is positive and finite.
void check_cosine_rows_args(const at::Tensor& x0, const at::Tensor& x1, double eps);

}  // namespace ssl_ops
