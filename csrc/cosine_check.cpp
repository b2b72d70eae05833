#include "cosine_check.h"

#include <c10/util/Exception.h>

#include <cmath>

namespace ssl_ops {

void check_cosine_rows_args(const at::Tensor& x0, const at::Tensor& x1, double eps) {
  constexpr const char* op = "ssl_ops.cosine_rows";
  TORCH_CHECK_VALUE(x0.dim() == 2, op, ": x0 must be a 2-D (rows, features) tensor, got shape ", x0.sizes());
  TORCH_CHECK_VALUE(
      x1.sizes() == x0.sizes(), op, ": x1 has shape ", x1.sizes(), " but x0 has shape ", x0.sizes());
  TORCH_CHECK_TYPE(
      at::isFloatingType(x0.scalar_type()), op, ": x0 must be a floating-point tensor, got dtype ",
      x0.scalar_type());
  TORCH_CHECK_TYPE(
      x1.scalar_type() == x0.scalar_type(), op, ": x1 has dtype ", x1.scalar_type(), " but x0 has dtype ",
      x0.scalar_type());
  TORCH_CHECK(x1.device() == x0.device(), op, ": x1 is on ", x1.device(), " but x0 is on ", x0.device());
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps > 0.0, op, ": eps must be positive, got ", eps);
}

}  // namespace ssl_ops
