#include "clip_check.h"

#include "feature_checks.h"

namespace ssl_ops {

void check_clip_args(const at::Tensor& query, const at::Tensor& key, const at::Tensor& scale, int64_t reduction) {
  constexpr const char* kOp = "ssl_ops.contrastive_clip_loss";
  check_feature_matrix(kOp, query, "query");
  check_feature_matrix(kOp, key, "key");
  check_same_features(kOp, query, "query", key, "key");
  TORCH_CHECK_VALUE(key.size(0) == query.size(0), ssl_ops::message(kOp, ": key row i is the positive of query row i, "
                    "so key needs as many rows as query: got ", key.size(0), " and ", query.size(0)));
  check_scalar_tensor(kOp, scale, "scale", query, "query");
  TORCH_CHECK_VALUE(reduction == 1 || reduction == 2, ssl_ops::message(kOp,
                    ": reduction must be 1 (mean) or 2 (sum), got ", reduction));
}

}  // namespace ssl_ops
