// Row-wise cosine similarity (BYOL loss, negative cosine similarity), CPU kernel.
//
//   cos_r = (x0_r / max(||x0_r||, eps)) . (x1_r / max(||x1_r||, eps))
// (F.cosine_similarity's definition: each norm clamped on its own). Backward,
// for grad g_r, with xh the clamped-normalised rows and n the norms:
//   d x0_r = g_r (xh1_r - cos_r xh0_r) / n0_r   where n0_r >= eps,
//            g_r xh1_r / eps                     below eps (the denominator is constant)
// and the same with 0 and 1 swapped (float16 outputs saturate). One pass over each row pair per direction,
// accumulation in float (double for float64), parallel over rows; the row loops
// are vector loops (an AVX2+FMA copy where the CPU has it).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <array>
#include <cmath>

#include "../contrastive_check.h"
#include "../cosine_check.h"
#include "cpu_isa.h"

namespace ssl_ops::cpu {
namespace {

template <typename C>
struct RowCosine {
  C cos, denom0, denom1, norm0, norm1;
};

// The three sums as vector reductions (a fixed order, so repeated runs agree).
template <typename T, typename C>
SSL_OPS_ALWAYS_INLINE inline RowCosine<C> row_cosine(const T* __restrict__ x0, const T* __restrict__ x1, int64_t d,
                                                     C eps) {
  C dot = 0, sq0 = 0, sq1 = 0;
#pragma omp simd reduction(+ : dot, sq0, sq1)
  for (int64_t k = 0; k < d; ++k) {
    const C a = static_cast<C>(x0[k]), b = static_cast<C>(x1[k]);
    dot += a * b;
    sq0 += a * a;
    sq1 += b * b;
  }
  const C n0 = std::sqrt(sq0), n1 = std::sqrt(sq1);
  const C d0 = std::max(n0, eps), d1 = std::max(n1, eps);
  return {dot / (d0 * d1), d0, d1, n0, n1};
}

// float16 gradients saturate at its largest finite value (a zero row's is g / eps).
template <typename T, typename C>
SSL_OPS_ALWAYS_INLINE inline T to_output(C v) {
  if constexpr (std::is_same_v<T, at::Half>) v = std::min(std::max(v, C(-65504)), C(65504));
  return static_cast<T>(v);
}

template <typename T>
using compute_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

template <typename T>
struct RowsArgs {
  const T* x0;
  const T* x1;
  int64_t d;
  compute_t<T> eps;
  const compute_t<T>* grad;  // backward
  T* out0;                   // backward, or null
  T* out1;                   // backward, or null
  compute_t<T>* cos;         // forward
};

template <typename T>
SSL_OPS_ALWAYS_INLINE inline void forward_rows(const RowsArgs<T>& p, int64_t begin, int64_t end) {
  for (int64_t r = begin; r < end; ++r) p.cos[r] = row_cosine(p.x0 + r * p.d, p.x1 + r * p.d, p.d, p.eps).cos;
}

// d out = g_r * (coef_other * other + coef_self * self), one vector loop per output.
template <typename T, typename C>
SSL_OPS_ALWAYS_INLINE inline void write_gradient(T* __restrict__ out, const T* __restrict__ self,
                                                 const T* __restrict__ other, int64_t d, C coef_self,
                                                 C coef_other) {
#pragma omp simd
  for (int64_t k = 0; k < d; ++k) {
    out[k] = to_output<T>(coef_other * static_cast<C>(other[k]) + coef_self * static_cast<C>(self[k]));
  }
}

template <typename T>
SSL_OPS_ALWAYS_INLINE inline void backward_rows(const RowsArgs<T>& p, int64_t begin, int64_t end) {
  using C = compute_t<T>;
  for (int64_t r = begin; r < end; ++r) {
    const T* xa = p.x0 + r * p.d;
    const T* xb = p.x1 + r * p.d;
    const RowCosine<C> rc = row_cosine(xa, xb, p.d, p.eps);
    // The radial term only where the norm is not clamped (below eps the denominator is constant).
    const C inv0 = p.grad[r] / rc.denom0, inv1 = p.grad[r] / rc.denom1;
    const C self0 = rc.norm0 >= p.eps ? rc.cos / rc.denom0 : C(0);
    const C self1 = rc.norm1 >= p.eps ? rc.cos / rc.denom1 : C(0);
    if (p.out0) write_gradient(p.out0 + r * p.d, xa, xb, p.d, -inv0 * self0, inv0 / rc.denom1);
    if (p.out1) write_gradient(p.out1 + r * p.d, xb, xa, p.d, -inv1 * self1, inv1 / rc.denom0);
  }
}

template <typename T>
SSL_OPS_TARGET_AVX2 void forward_rows_avx2(const RowsArgs<T>& p, int64_t begin, int64_t end) {
  forward_rows(p, begin, end);
}
template <typename T>
SSL_OPS_TARGET_AVX2 void backward_rows_avx2(const RowsArgs<T>& p, int64_t begin, int64_t end) {
  backward_rows(p, begin, end);
}

// Rows per task: about 32K elements, so short rows are not one task each.
int64_t row_grain(int64_t d) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(d, 1)); }

template <typename T>
at::Tensor cosine_rows_impl(const at::Tensor& x0, const at::Tensor& x1, double eps) {
  const int64_t m = x0.size(0);
  at::Tensor out = at::empty({m}, x0.options().dtype(loss_dtype(x0.scalar_type())));
  RowsArgs<T> p{x0.const_data_ptr<T>(), x1.const_data_ptr<T>(), x0.size(1), static_cast<compute_t<T>>(eps),
                nullptr, nullptr, nullptr, out.data_ptr<compute_t<T>>()};
  const bool avx2 = cpu_has_avx2_fma();
  at::parallel_for(0, m, row_grain(p.d), [&](int64_t begin, int64_t end) {
    avx2 ? forward_rows_avx2(p, begin, end) : forward_rows(p, begin, end);
  });
  return out;
}

template <typename T>
std::tuple<at::Tensor, at::Tensor> cosine_rows_backward_impl(const at::Tensor& grad, const at::Tensor& x0,
                                                             const at::Tensor& x1, double eps,
                                                             std::array<bool, 2> mask) {
  using C = compute_t<T>;
  const at::Tensor g = grad.to(loss_dtype(x0.scalar_type())).contiguous();
  at::Tensor g0 = mask[0] ? at::empty_like(x0) : at::empty({0}, x0.options());
  at::Tensor g1 = mask[1] ? at::empty_like(x1) : at::empty({0}, x1.options());
  RowsArgs<T> p{x0.const_data_ptr<T>(), x1.const_data_ptr<T>(), x0.size(1), static_cast<C>(eps),
                g.const_data_ptr<C>(), mask[0] ? g0.data_ptr<T>() : nullptr,
                mask[1] ? g1.data_ptr<T>() : nullptr, nullptr};
  const bool avx2 = cpu_has_avx2_fma();
  at::parallel_for(0, x0.size(0), row_grain(p.d), [&](int64_t begin, int64_t end) {
    avx2 ? backward_rows_avx2(p, begin, end) : backward_rows(p, begin, end);
  });
  return {g0, g1};
}

at::Tensor cosine_rows(const at::Tensor& x0_in, const at::Tensor& x1_in, double eps) {
  check_cosine_rows_args(x0_in, x1_in, eps);
  const at::Tensor x0 = x0_in.contiguous(), x1 = x1_in.contiguous();
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x0.scalar_type(), "cosine_rows", [&] {
    out = cosine_rows_impl<scalar_t>(x0, x1, eps);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> cosine_rows_backward(const at::Tensor& grad, const at::Tensor& x0_in,
                                                        const at::Tensor& x1_in, double eps,
                                                        std::array<bool, 2> mask) {
  check_cosine_rows_args(x0_in, x1_in, eps);
  const at::Tensor x0 = x0_in.contiguous(), x1 = x1_in.contiguous();
  std::tuple<at::Tensor, at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x0.scalar_type(), "cosine_rows_backward", [&] {
    out = cosine_rows_backward_impl<scalar_t>(grad, x0, x1, eps, mask);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(ssl_ops, CPU, m) {
  m.impl("cosine_rows", &cosine_rows);
  m.impl("cosine_rows_backward", &cosine_rows_backward);
}

}  // namespace ssl_ops::cpu
