#include "siglip_check.h"
#include "message.h"

#include <c10/util/Exception.h>

namespace ssl_ops {
namespace {

constexpr const char* kOp = "ssl_ops.siglip_loss";

void check_features(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.dim() == 2, ssl_ops::message(kOp, ": ", name,
                    " must be a 2-D (batch, features) tensor, got shape ", t.sizes()));
  TORCH_CHECK_VALUE(t.size(0) > 0, ssl_ops::message(kOp, ": ", name, " is an empty batch (shape ", t.sizes(), ")"));
  TORCH_CHECK_VALUE(t.size(1) > 0, ssl_ops::message(kOp, ": ", name, " has no features (shape ", t.sizes(), ")"));
  TORCH_CHECK_TYPE(at::isFloatingType(t.scalar_type()), ssl_ops::message(kOp, ": ", name,
                   " must be a floating-point tensor, got dtype ", t.scalar_type()));
}

void check_scalar(const at::Tensor& t, const at::Tensor& x, const char* name) {
  TORCH_CHECK_VALUE(t.numel() == 1, ssl_ops::message(kOp, ": ", name,
                    " must be a scalar (one element), got shape ", t.sizes()));
  TORCH_CHECK_TYPE(at::isFloatingType(t.scalar_type()), ssl_ops::message(kOp, ": ", name,
                   " must be a floating-point tensor, got dtype ", t.scalar_type()));
  TORCH_CHECK(t.device() == x.device(), ssl_ops::message(kOp, ": ", name, " is on ", t.device(),
              " but image_features is on ", x.device()));
}

}  // namespace

void check_siglip_args(const at::Tensor& x, const at::Tensor& y, const at::Tensor& scale,
                       const std::optional<at::Tensor>& bias, int64_t positive_offset) {
  check_features(x, "image_features");
  check_features(y, "text_features");
  TORCH_CHECK_VALUE(y.size(1) == x.size(1), ssl_ops::message(kOp, ": text_features has ", y.size(1),
                    " features but image_features has ", x.size(1)));
  TORCH_CHECK_TYPE(y.scalar_type() == x.scalar_type(), ssl_ops::message(kOp, ": text_features has dtype ",
                   y.scalar_type(), " but image_features has dtype ", x.scalar_type()));
  TORCH_CHECK(y.device() == x.device(), ssl_ops::message(kOp, ": text_features is on ", y.device(),
              " but image_features is on ", x.device()));
  TORCH_CHECK_VALUE(positive_offset >= 0 && x.size(0) + positive_offset <= y.size(0), ssl_ops::message(kOp,
                    ": text row i + positive_offset is the positive of image row i, so text_features needs ",
                    x.size(0), " + ", positive_offset, " rows, got ", y.size(0)));
  check_scalar(scale, x, "logit_scale");
  if (bias.has_value()) check_scalar(*bias, x, "logit_bias");
}

}  // namespace ssl_ops
