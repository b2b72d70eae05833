#include "siglip_check.h"

#include "feature_checks.h"

namespace ssl_ops {

void check_siglip_args(const at::Tensor& x, const at::Tensor& y, const at::Tensor& scale,
                       const std::optional<at::Tensor>& bias, int64_t positive_offset) {
  constexpr const char* kOp = "ssl_ops.siglip_loss";
  check_feature_matrix(kOp, x, "image_features");
  check_feature_matrix(kOp, y, "text_features");
  check_same_features(kOp, x, "image_features", y, "text_features");
  TORCH_CHECK_VALUE(positive_offset >= 0 && x.size(0) + positive_offset <= y.size(0), ssl_ops::message(kOp,
                    ": text row i + positive_offset is the positive of image row i, so text_features needs ",
                    x.size(0), " + ", positive_offset, " rows, got ", y.size(0)));
  check_scalar_tensor(kOp, scale, "logit_scale", x, "image_features");
  if (bias.has_value()) check_scalar_tensor(kOp, *bias, "logit_bias", x, "image_features");
}

}  // namespace ssl_ops
