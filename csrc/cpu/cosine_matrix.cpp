// Cosine-similarity matrix, CPU kernel.
//
//   C[i, j] = a_i . b_j / (max(||a_i||, eps) * max(||b_j||, eps))     (b = a when b is None)
// which is F.cosine_similarity(a[:, None], b[None], dim=-1, eps) exactly (it
// clamps each norm on its own). Forward, two routes by size:
//   (M + N) * D <= M * N  ->  normalised copies of a and b, then the vendor GEMM;
//   otherwise             ->  GEMM of the raw rows, then one vectorised epilogue
//                             pass applying both inverse norms (no copies).
// Why (benchmarks/cosine.py, 2-core Xeon, fp32, 2026-11-28): with the epilogue
// on every shape, 1024x1024x128 took 1.07 ms against 0.96 ms for F.normalize +
// matmul, 4096x4096x128 31.0 against 28.6 ms, 4096x4096x2048 220.7 against
// 214.5 ms: a pass over the M x N output costs more than normalising the
// M + N input rows unless the rows are much longer than the output is wide.
// With b = None and D >= 512, only the tiles on and above the diagonal are
// multiplied, each written to both halves; below 512 features the halved
// FLOPs do not pay for writing every tile twice, and one GEMM does it all
// (same benchmark, b = None, symmetric tiles vs normalise + matmul: D 128
// 1024 rows 0.95 vs 0.73 ms, 4096 rows 40.3 vs 30.5 ms; D 256: 9.6 vs 5.9 ms at
// 2048 rows; D 384: mixed; D 512: 2.8 vs 3.1 ms at 1024 rows, 62 vs 67 ms at
// 4096; D 2048: 159 vs 223 ms at 4096). Float64 stays float64;
// other dtypes multiply in float32 and round once to the input dtype.
// Backward (an upstream gradient broadcast along a dimension, as out.sum()
// gives, is rank one and skips the GEMMs: csrc/cosine_rank_one.h):
// with g = dC . b_hat, d a_i = (g_i - a_hat_i (a_hat_i . g_i)) / ||a_i||
// (g_i / eps below eps), and the same for b with dC^T . a_hat; with b = None,
// g = (dC + dC^T) . a_hat, formed as two products without a transposed copy.
// a_hat and b_hat are written for the GEMMs: an (N, D) scaled copy costs less
// than scaling the (M, N) dC.
#include <ATen/Parallel.h>
#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/clamp_min.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/linalg_vector_norm.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/reciprocal.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <utility>
#include <vector>

#include "../cosine_check.h"
#include "../cosine_rank_one.h"
#include "contrastive_tiles.h"

namespace ssl_ops::cpu {
namespace {

constexpr int64_t kSymmetricTile = 256;
constexpr int64_t kSymmetricMinFeatures = 512;  // see the top of this file

at::ScalarType compute_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

template <typename C>
SSL_OPS_ALWAYS_INLINE inline void scale_rows(C* out, int64_t rows, int64_t cols, int64_t ld, const C* row_inv,
                                             const C* col_inv) {
  for (int64_t i = 0; i < rows; ++i) {
    C* __restrict__ o = out + i * ld;
    const C r = row_inv[i];
#pragma omp simd
    for (int64_t j = 0; j < cols; ++j) o[j] *= r * col_inv[j];
  }
}
template <typename C>
SSL_OPS_TARGET_AVX2 void scale_rows_avx2(C* out, int64_t rows, int64_t cols, int64_t ld, const C* row_inv,
                                         const C* col_inv) {
  scale_rows(out, rows, cols, ld, row_inv, col_inv);
}

template <typename C>
void apply_inverse_norms(at::Tensor& out, int64_t r0, int64_t rows, int64_t c0, int64_t cols, const C* row_inv,
                         const C* col_inv) {
  auto* fn = cpu_has_avx2_fma() ? &scale_rows_avx2<C> : &scale_rows<C>;
  fn(out.data_ptr<C>() + r0 * out.stride(0) + c0, rows, cols, out.stride(0), row_inv + r0, col_inv + c0);
}

// 1 / max(||x_i||, eps) for rows already in the compute type.
at::Tensor inverse_norms(const at::Tensor& rows, double eps) {
  return at::clamp_min(at::linalg_vector_norm(rows, 2, {1}), eps).reciprocal().contiguous();
}

// rows . rows^T on the tiles on and above the diagonal, each written to both
// halves; inverse norms applied per tile unless null (rows already unit).
template <typename C>
at::Tensor symmetric_tiles(const at::Tensor& rows, const C* inv) {
  const int64_t m = rows.size(0);
  at::Tensor out = at::empty({m, m}, rows.options());
  std::vector<std::pair<int64_t, int64_t>> pairs;
  const int64_t blocks = (m + kSymmetricTile - 1) / kSymmetricTile;
  for (int64_t k = 0; k < blocks; ++k)
    for (int64_t i = 0; i <= k; ++i) pairs.emplace_back(i, k);
  at::parallel_for(0, static_cast<int64_t>(pairs.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const int64_t i0 = pairs[p].first * kSymmetricTile, k0 = pairs[p].second * kSymmetricTile;
      const int64_t bi = std::min(kSymmetricTile, m - i0), bk = std::min(kSymmetricTile, m - k0);
      at::Tensor block = out.narrow(0, i0, bi).narrow(1, k0, bk);
      block.copy_(at::mm(rows.narrow(0, i0, bi), rows.narrow(0, k0, bk).t()));
      if (inv) apply_inverse_norms<C>(out, i0, bi, k0, bk, inv, inv);
      if (i0 != k0) out.narrow(0, k0, bk).narrow(1, i0, bi).copy_(block.t());
    }
  });
  return out;
}

template <typename C>
at::Tensor matrix_impl(const at::Tensor& a, const std::optional<at::Tensor>& b, double eps) {
  const at::ScalarType compute = at::CppTypeToScalarType<C>::value;
  const int64_t m = a.size(0), n = b.has_value() ? b->size(0) : m;
  const bool symmetric = !b.has_value() && a.size(1) >= kSymmetricMinFeatures;
  if ((m + n) * a.size(1) <= m * n) {  // normalised copies (the route: see the top of this file)
    const NormalizedRows na = normalize_rows(a, eps, true, compute);
    if (symmetric) return symmetric_tiles<C>(na.rows, nullptr);
    if (!b.has_value()) return at::mm(na.rows, na.rows.t());
    return at::mm(na.rows, normalize_rows(*b, eps, true, compute).rows.t());
  }
  // Raw rows, inverse norms in the epilogue: no normalised copy.
  const at::Tensor rows_a = a.to(compute).contiguous();
  const at::Tensor ia = inverse_norms(rows_a, eps);
  if (symmetric) return symmetric_tiles<C>(rows_a, ia.const_data_ptr<C>());
  const at::Tensor rows_b = b.has_value() ? b->to(compute).contiguous() : rows_a;
  const at::Tensor ib = b.has_value() ? inverse_norms(rows_b, eps) : ia;
  at::Tensor out = at::mm(rows_a, rows_b.t());
  at::parallel_for(0, m, std::max<int64_t>(1, 16384 / std::max<int64_t>(n, 1)), [&](int64_t begin, int64_t end) {
    apply_inverse_norms<C>(out, begin, end - begin, 0, n, ia.const_data_ptr<C>(), ib.const_data_ptr<C>());
  });
  return out;
}

at::Tensor cosine_similarity_matrix(const at::Tensor& a, const std::optional<at::Tensor>& b, double eps) {
  check_cosine_matrix_args(a, b, eps);
  const at::Tensor out = a.scalar_type() == at::kDouble ? matrix_impl<double>(a, b, eps) : matrix_impl<float>(a, b, eps);
  return out.to(a.scalar_type());
}

std::tuple<at::Tensor, at::Tensor> cosine_similarity_matrix_backward(const at::Tensor& grad, const at::Tensor& a,
                                                                     const std::optional<at::Tensor>& b, double eps,
                                                                     std::array<bool, 2> mask) {
  check_cosine_matrix_args(a, b, eps);
  const at::ScalarType compute = compute_type(a.scalar_type());
  const NormalizedRows na = normalize_rows(a, eps, true, compute);
  at::Tensor ga = at::empty({0}, a.options()), gb = at::empty({0}, a.options());
  if (const std::optional<RankOne> r = rank_one(grad, compute)) {
    if (!b.has_value()) {
      if (mask[0]) {
        ga = normalize_rows_backward(
            na, rank_one_product(r->u, r->v, na.rows) + rank_one_product(r->v, r->u, na.rows), a.scalar_type());
      }
      return {ga, gb};
    }
    const NormalizedRows nb = normalize_rows(*b, eps, true, compute);
    if (mask[0]) ga = normalize_rows_backward(na, rank_one_product(r->u, r->v, nb.rows), a.scalar_type());
    if (mask[1]) gb = normalize_rows_backward(nb, rank_one_product(r->v, r->u, na.rows), b->scalar_type());
    return {ga, gb};
  }
  // Contiguous once: a strided grad would be copied by each GEMM.
  const at::Tensor g = grad.to(compute).contiguous();
  if (!b.has_value()) {
    if (mask[0]) ga = normalize_rows_backward(na, at::mm(g, na.rows) + at::mm(g.t(), na.rows), a.scalar_type());
    return {ga, gb};
  }
  const NormalizedRows nb = normalize_rows(*b, eps, true, compute);
  if (mask[0]) ga = normalize_rows_backward(na, at::mm(g, nb.rows), a.scalar_type());
  if (mask[1]) gb = normalize_rows_backward(nb, at::mm(g.t(), na.rows), b->scalar_type());
  return {ga, gb};
}

}  // namespace

TORCH_LIBRARY_IMPL(ssl_ops, CPU, m) {
  m.impl("cosine_similarity_matrix", &cosine_similarity_matrix);
  m.impl("cosine_similarity_matrix_backward", &cosine_similarity_matrix_backward);
}

}  // namespace ssl_ops::cpu
