#include "cosine_check.h"
#include "message.h"

#include <c10/util/Exception.h>

#include <cmath>

namespace ssl_ops {

void check_cosine_rows_args(const at::Tensor& x0, const at::Tensor& x1, double eps) {
  constexpr const char* op = "ssl_ops.cosine_rows";
  TORCH_CHECK_VALUE(x0.dim() == 2, ssl_ops::message(op, ": x0 must be a 2-D (rows, features) tensor, got shape ", x0.sizes()));
  TORCH_CHECK_VALUE(
      x1.sizes() == x0.sizes(), ssl_ops::message(op, ": x1 has shape ", x1.sizes(), " but x0 has shape ", x0.sizes()));
  TORCH_CHECK_TYPE(
      at::isFloatingType(x0.scalar_type()), ssl_ops::message(op, ": x0 must be a floating-point tensor, got dtype ",
      x0.scalar_type()));
  TORCH_CHECK_TYPE(
      x1.scalar_type() == x0.scalar_type(), ssl_ops::message(op, ": x1 has dtype ", x1.scalar_type(), " but x0 has dtype ",
      x0.scalar_type()));
  TORCH_CHECK(x1.device() == x0.device(), ssl_ops::message(op, ": x1 is on ", x1.device(), " but x0 is on ", x0.device()));
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps > 0.0, ssl_ops::message(op, ": eps must be positive, got ", eps));
}

void check_cosine_matrix_args(const at::Tensor& a, const std::optional<at::Tensor>& b, double eps) {
  constexpr const char* op = "ssl_ops.cosine_similarity_matrix";
  TORCH_CHECK_VALUE(a.dim() == 2, ssl_ops::message(op, ": a must be a 2-D (rows, features) tensor, got shape ", a.sizes()));
  TORCH_CHECK_VALUE(a.size(1) > 0, ssl_ops::message(op, ": a has no features (shape ", a.sizes(), ")"));
  TORCH_CHECK_TYPE(
      at::isFloatingType(a.scalar_type()), ssl_ops::message(op, ": a must be a floating-point tensor, got dtype ", a.scalar_type()));
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps > 0.0, ssl_ops::message(op, ": eps must be positive, got ", eps));
  if (!b.has_value()) return;
  TORCH_CHECK_VALUE(b->dim() == 2, ssl_ops::message(op, ": b must be a 2-D (rows, features) tensor, got shape ", b->sizes()));
  TORCH_CHECK_VALUE(
      b->size(1) == a.size(1), ssl_ops::message(op, ": b has ", b->size(1), " features but a has ", a.size(1)));
  TORCH_CHECK_TYPE(
      b->scalar_type() == a.scalar_type(), ssl_ops::message(op, ": b has dtype ", b->scalar_type(), " but a has dtype ",
      a.scalar_type()));
  TORCH_CHECK(b->device() == a.device(), ssl_ops::message(op, ": b is on ", b->device(), " but a is on ", a.device()));
}

}  // namespace ssl_ops
