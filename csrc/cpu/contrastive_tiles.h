#pragma once
// Building blocks of the CPU contrastive-loss kernels (contrastive_sym.cpp,
// contrastive_asym.cpp): row normalisation and its backward, a vectorisable
// exp, and the round-robin schedule of symmetric tile pairs.
#include <ATen/core/Tensor.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <utility>
#include <vector>

#include "cpu_isa.h"

namespace ssl_ops::cpu {

constexpr int64_t kTileRows = 128;

// Rows scaled to unit length, x / max(||x||, eps), in the compute type C
// (double for float64 inputs, float otherwise, so fp16 inputs cannot underflow
// eps). With normalize=false the rows are only converted.
struct NormalizedRows {
  at::Tensor rows;   // (M, D), compute type
  at::Tensor denom;    // (M,), max(||x||, eps), compute type; undefined without normalisation
  at::Tensor clamped;  // (M,) bool: ||x|| < eps, where the denominator is constant
  bool normalized = true;
};
// any_layout: without normalisation, a row-major or column-major x of the compute
// type is used as it is (a (D, K) queue passed transposed is never copied); the
// callers then reach the rows only through ATen ops, which take any strides.
NormalizedRows normalize_rows(const at::Tensor& x, double eps, bool normalize, at::ScalarType compute,
                              bool any_layout = false);

// Gradient through the normalisation, as autograd of F.normalize gives it:
// dx = (g - x_hat (x_hat . g)) / ||x|| where ||x|| >= eps, g / eps below;
// saturated to float16's range for float16 outputs.
at::Tensor normalize_rows_backward(
    const NormalizedRows& n, const at::Tensor& grad_rows, at::ScalarType out_dtype);

// exp for the tile loops: Cody-Waite range reduction and a degree-7 Taylor
// polynomial, within 2 ulp of std::exp on [-87, 88] and 0 below; branch-free,
// so loops over it vectorise. Double uses std::exp (gradcheck path).
SSL_OPS_ALWAYS_INLINE inline float tile_exp(float x) {
  // Plain comparisons, not fmin/fmax (whose NaN rules keep loops scalar).
  float clamped = x < -87.0f ? -87.0f : x;
  clamped = clamped > 88.0f ? 88.0f : clamped;
  const float shifter = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const float n = (clamped * 1.44269504088896341f + shifter) - shifter;
  float r = std::fma(n, -0.693145751953125f, clamped);
  r = std::fma(n, -1.428606765330187e-06f, r);
  float p = 1.0f / 5040.0f;
  p = std::fma(p, r, 1.0f / 720.0f);
  p = std::fma(p, r, 1.0f / 120.0f);
  p = std::fma(p, r, 1.0f / 24.0f);
  p = std::fma(p, r, 1.0f / 6.0f);
  p = std::fma(p, r, 0.5f);
  p = std::fma(p, r, 1.0f);
  p = std::fma(p, r, 1.0f);
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, sizeof(two_n));
  return x < -87.0f ? 0.0f : p * two_n;
}
inline double tile_exp(double x) { return std::exp(x); }

// Online log-sum-exp state of one row: lse = max + log(sum). To merge a block
// of values: shift = next_max(block_max), then merge(shift, sum of exp(v - shift)).
template <typename C>
struct RunningLse {
  C max = -std::numeric_limits<C>::infinity();
  C sum = 0;
  C next_max(C block_max) const { return std::max(max, block_max); }
  void merge(C shift, C block_sum) {
    if (shift == -std::numeric_limits<C>::infinity()) return;  // nothing but excluded values yet
    sum = sum * tile_exp(max - shift) + block_sum;
    max = shift;
  }
  C value() const { return max + std::log(sum); }
};

// Every unordered pair of the n row blocks (and each block with itself) once,
// grouped in rounds where no block appears twice, so the tasks of a round may
// write their blocks' rows in parallel (the circle method of round-robin
// tournaments; the first round pairs each block with itself).
std::vector<std::vector<std::pair<int64_t, int64_t>>> symmetric_tile_rounds(int64_t blocks);

}  // namespace ssl_ops::cpu
