#include "contrastive_check.h"
#include "message.h"

#include <c10/util/Exception.h>

#include <cmath>
#include <cstdlib>

namespace ssl_ops {
namespace {

void check_matrix(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK_VALUE(
      t.dim() == 2, ssl_ops::message(op, ": ", name, " must be a 2-D (rows, features) tensor, got shape ", t.sizes()));
  TORCH_CHECK_VALUE(t.size(0) > 0, ssl_ops::message(op, ": ", name, " is empty (shape ", t.sizes(), ")"));
  TORCH_CHECK_VALUE(t.size(1) > 0, ssl_ops::message(op, ": ", name, " has no features (shape ", t.sizes(), ")"));
  TORCH_CHECK_TYPE(
      at::isFloatingType(t.scalar_type()), ssl_ops::message(op, ": ", name,
      " must be a floating-point tensor, got dtype ", t.scalar_type()));
}

void check_scalars(const char* op, double scale, double eps, int64_t reduction) {
  TORCH_CHECK_VALUE(
      std::isfinite(scale) && scale != 0.0, ssl_ops::message(op,
      ": 1 / temperature must be finite and non-zero, got ", scale));
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps > 0.0, ssl_ops::message(op, ": eps must be positive, got ", eps));
  TORCH_CHECK_VALUE(
      reduction >= 0 && reduction <= 2, ssl_ops::message(op, ": reduction must be 0 (none), 1 (mean) or 2 (sum), got ",
      reduction));
}

void check_same(const at::Tensor& a, const at::Tensor& b, const char* op, const char* a_name,
                const char* b_name) {
  TORCH_CHECK(
      a.device() == b.device(), ssl_ops::message(op, ": ", b_name, " is on ", b.device(), " but ", a_name, " is on ",
      a.device()));
  TORCH_CHECK_TYPE(
      a.scalar_type() == b.scalar_type(), ssl_ops::message(op, ": ", b_name, " has dtype ", b.scalar_type(), " but ",
      a_name, " has dtype ", a.scalar_type()));
  TORCH_CHECK_VALUE(
      a.size(1) == b.size(1), ssl_ops::message(op, ": ", b_name, " has ", b.size(1), " features but ", a_name,
      " has ", a.size(1)));
}

}  // namespace

void check_sym_contrastive_args(
    const at::Tensor& z, const at::Tensor& labels, int64_t anchor_begin, int64_t anchor_end, double scale,
    double eps, int64_t reduction, int64_t positives) {
  constexpr const char* op = "ssl_ops.contrastive_sym_loss";
  check_matrix(z, op, "z");
  check_scalars(op, scale, eps, reduction);
  TORCH_CHECK_VALUE(
      positives >= 0 && positives <= 2, ssl_ops::message(op,
      ": positives must be 0 (mean outside the log), 1 (log-sum-exp inside it) or 2 (excluded), got ",
      positives));
  TORCH_CHECK_VALUE(
      labels.dim() == 1 && labels.size(0) == z.size(0), ssl_ops::message(op, ": labels must have shape [",
      z.size(0), "] (one per row of z), got ", labels.sizes()));
  TORCH_CHECK_TYPE(
      labels.scalar_type() == at::kLong, ssl_ops::message(op, ": labels must be int64, got dtype ",
      labels.scalar_type()));
  TORCH_CHECK(
      labels.device() == z.device(), ssl_ops::message(op, ": labels is on ", labels.device(), " but z is on ",
      z.device()));
  TORCH_CHECK_VALUE(
      0 <= anchor_begin && anchor_begin < anchor_end && anchor_end <= z.size(0), ssl_ops::message(op,
      ": the anchor rows [anchor_begin, anchor_end) = [", anchor_begin, ", ", anchor_end,
      ") must be a non-empty range within the ", z.size(0), " rows of z"));
}

void check_sym_lse_positive(const at::Tensor& z, const std::optional<at::Tensor>& lse_positive,
                            int64_t positives) {
  if (positives != static_cast<int64_t>(PositiveReduction::kLogSumExp)) return;
  constexpr const char* op = "ssl_ops.contrastive_sym_backward";
  TORCH_CHECK_VALUE(lse_positive.has_value() && lse_positive->defined(), ssl_ops::message(op,
      ": positives = 1 needs lse_positive, the forward's log-sum-exp over each row's positives"));
  TORCH_CHECK_VALUE(
      lse_positive->dim() == 1 && lse_positive->size(0) == z.size(0), ssl_ops::message(op,
      ": lse_positive must have shape [", z.size(0), "] (one per row of z), got ", lse_positive->sizes()));
  TORCH_CHECK(
      lse_positive->device() == z.device(), ssl_ops::message(op, ": lse_positive is on ", lse_positive->device(),
      " but z is on ", z.device()));
  TORCH_CHECK_TYPE(
      lse_positive->scalar_type() == loss_dtype(z.scalar_type()), ssl_ops::message(op,
      ": lse_positive must have dtype ", loss_dtype(z.scalar_type()), ", got ", lse_positive->scalar_type()));
}

void check_asym_contrastive_args(
    const at::Tensor& query, const at::Tensor& key, const std::optional<at::Tensor>& positive_key,
    int64_t positive_offset, double scale, double eps, int64_t reduction) {
  constexpr const char* op = "ssl_ops.contrastive_asym_loss";
  check_matrix(query, op, "query");
  check_matrix(key, op, "key");
  check_scalars(op, scale, eps, reduction);
  check_same(query, key, op, "query", "key");
  if (positive_key.has_value()) {
    check_matrix(*positive_key, op, "positive_key");
    check_same(query, *positive_key, op, "query", "positive_key");
    TORCH_CHECK_VALUE(
        positive_key->size(0) == query.size(0), ssl_ops::message(op, ": positive_key has ", positive_key->size(0),
        " rows but query has ", query.size(0)));
    TORCH_CHECK_VALUE(
        positive_offset == 0, ssl_ops::message(op, ": positive_offset must be 0 with a positive_key, got ", positive_offset));
  } else {
    TORCH_CHECK_VALUE(
        positive_offset >= 0 && query.size(0) + positive_offset <= key.size(0), ssl_ops::message(op,
        ": without positive_key, key row i + positive_offset is the positive of query row i, so key "
        "needs ", query.size(0), " + ", positive_offset, " rows, got ", key.size(0)));
  }
}

int64_t contrastive_chunk_elements(int64_t default_elements) {
  const char* value = std::getenv("SSL_OPS_CONTRASTIVE_CHUNK_ELEMENTS");
  if (value == nullptr || *value == '\0') return default_elements;
  char* end = nullptr;
  const long long parsed = std::strtoll(value, &end, 10);
  TORCH_CHECK(end != value && *end == '\0' && parsed > 0,
              ssl_ops::message("SSL_OPS_CONTRASTIVE_CHUNK_ELEMENTS must be a positive integer, got \"", value, "\""));
  return parsed;
}

}  // namespace ssl_ops
