#pragma once
// Argument checks shared by the pair losses' ops (siglip_check.cpp,
// clip_check.cpp): each error names the op, the argument and the value.
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "message.h"

namespace ssl_ops {

// A non-empty floating (batch, features) matrix.
inline void check_feature_matrix(const char* op, const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.dim() == 2, ssl_ops::message(op, ": ", name,
                    " must be a 2-D (batch, features) tensor, got shape ", t.sizes()));
  TORCH_CHECK_VALUE(t.size(0) > 0, ssl_ops::message(op, ": ", name, " is an empty batch (shape ", t.sizes(), ")"));
  TORCH_CHECK_VALUE(t.size(1) > 0, ssl_ops::message(op, ": ", name, " has no features (shape ", t.sizes(), ")"));
  TORCH_CHECK_TYPE(at::isFloatingType(t.scalar_type()), ssl_ops::message(op, ": ", name,
                   " must be a floating-point tensor, got dtype ", t.scalar_type()));
}

// b's features, dtype and device are a's.
inline void check_same_features(const char* op, const at::Tensor& a, const char* a_name, const at::Tensor& b,
                                const char* b_name) {
  TORCH_CHECK_VALUE(b.size(1) == a.size(1), ssl_ops::message(op, ": ", b_name, " has ", b.size(1),
                    " features but ", a_name, " has ", a.size(1)));
  TORCH_CHECK_TYPE(b.scalar_type() == a.scalar_type(), ssl_ops::message(op, ": ", b_name, " has dtype ",
                   b.scalar_type(), " but ", a_name, " has dtype ", a.scalar_type()));
  TORCH_CHECK(b.device() == a.device(), ssl_ops::message(op, ": ", b_name, " is on ", b.device(), " but ", a_name,
              " is on ", a.device()));
}

// A one-element floating tensor on x's device.
inline void check_scalar_tensor(const char* op, const at::Tensor& t, const char* name, const at::Tensor& x,
                                const char* x_name) {
  TORCH_CHECK_VALUE(t.numel() == 1, ssl_ops::message(op, ": ", name,
                    " must be a scalar (one element), got shape ", t.sizes()));
  TORCH_CHECK_TYPE(at::isFloatingType(t.scalar_type()), ssl_ops::message(op, ": ", name,
                   " must be a floating-point tensor, got dtype ", t.scalar_type()));
  TORCH_CHECK(t.device() == x.device(), ssl_ops::message(op, ": ", name, " is on ", t.device(), " but ", x_name,
              " is on ", x.device()));
}

}  // namespace ssl_ops
