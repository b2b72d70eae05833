#include "contrastive_tiles.h"

#include <ATen/TensorOperators.h>
#include <ATen/ops/clamp.h>
#include <ATen/ops/clamp_min.h>
#include <ATen/ops/linalg_vector_norm.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros.h>

namespace ssl_ops::cpu {

NormalizedRows normalize_rows(const at::Tensor& x, double eps, bool normalize, at::ScalarType compute,
                              bool any_layout) {
  NormalizedRows n;
  at::Tensor rows = x.to(compute);
  const bool column_major = rows.dim() == 2 && rows.t().is_contiguous();
  if (!(any_layout && !normalize && column_major)) rows = rows.contiguous();
  n.normalized = normalize;
  if (!normalize) {
    n.rows = rows;
    return n;
  }
  const at::Tensor norm = at::linalg_vector_norm(rows, 2, {1}, /*keepdim=*/true);
  n.denom = at::clamp_min(norm, eps);
  n.clamped = norm < eps;  // clamp_min passes the gradient at equality
  n.rows = rows / n.denom;
  return n;
}

at::Tensor normalize_rows_backward(
    const NormalizedRows& n, const at::Tensor& grad_rows, at::ScalarType out_dtype) {
  if (!n.normalized) return grad_rows.to(out_dtype);
  const at::Tensor radial = at::sum(n.rows * grad_rows, {1}, /*keepdim=*/true);
  const at::Tensor tangential = (grad_rows - n.rows * radial) / n.denom;
  at::Tensor grad = at::where(n.clamped, grad_rows / n.denom, tangential);
  if (out_dtype == at::kHalf) {
    // A row near zero gets (d zh) / eps, far past float16's range: saturate so
    // it stays finite.
    grad = grad.clamp(-65504.0, 65504.0);
  }
  return grad.to(out_dtype);
}

std::vector<std::vector<std::pair<int64_t, int64_t>>> symmetric_tile_rounds(int64_t blocks) {
  std::vector<std::vector<std::pair<int64_t, int64_t>>> rounds;
  std::vector<std::pair<int64_t, int64_t>> diagonal;
  for (int64_t b = 0; b < blocks; ++b) diagonal.emplace_back(b, b);
  rounds.push_back(std::move(diagonal));
  // Circle method: block `fixed` stays, the others rotate; an odd count gets a
  // phantom block whose partner sits the round out.
  const int64_t even = blocks + (blocks % 2);
  const int64_t fixed = even - 1;
  for (int64_t r = 0; r < even - 1; ++r) {
    std::vector<std::pair<int64_t, int64_t>> round;
    auto add = [&](int64_t a, int64_t b) {
      if (a < blocks && b < blocks) round.emplace_back(std::min(a, b), std::max(a, b));
    };
    add(fixed, r);
    for (int64_t i = 1; i < even / 2; ++i) {
      add((r + i) % (even - 1), (r - i + even - 1) % (even - 1));
    }
    if (!round.empty()) rounds.push_back(std::move(round));
  }
  return rounds;
}

}  // namespace ssl_ops::cpu
