// Row-wise cosine similarity (BYOL loss, negative cosine similarity), CPU kernel.
//
//   cos_r = (x0_r / max(||x0_r||, eps)) . (x1_r / max(||x1_r||, eps))
// (F.cosine_similarity's definition: each norm clamped on its own). Backward,
// for grad g_r, with xh the clamped-normalised rows and n the norms:
//   d x0_r = g_r (xh1_r - cos_r xh0_r) / n0_r   where n0_r >= eps,
//            g_r xh1_r / eps                     below eps (the denominator is constant)
// and the same with 0 and 1 swapped (float16 outputs saturate). One pass over each row pair per direction,
// accumulation in float (double for float64), parallel over rows.
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

namespace ssl_ops::cpu {
namespace {

template <typename C>
struct RowCosine {
  C cos, denom0, denom1, norm0, norm1;
};

template <typename T, typename C>
RowCosine<C> row_cosine(const T* x0, const T* x1, int64_t d, C eps) {
  C dot = 0, sq0 = 0, sq1 = 0;
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
inline T to_output(C v) {
  if constexpr (std::is_same_v<T, at::Half>) v = std::min(std::max(v, C(-65504)), C(65504));
  return static_cast<T>(v);
}

template <typename T>
at::Tensor cosine_rows_impl(const at::Tensor& x0, const at::Tensor& x1, double eps) {
  using C = std::conditional_t<std::is_same_v<T, double>, double, float>;
  const int64_t m = x0.size(0), d = x0.size(1);
  at::Tensor out = at::empty({m}, x0.options().dtype(loss_dtype(x0.scalar_type())));
  const T* a = x0.const_data_ptr<T>();
  const T* b = x1.const_data_ptr<T>();
  C* o = out.data_ptr<C>();
  at::parallel_for(0, m, std::max<int64_t>(1, 32768 / std::max<int64_t>(d, 1)), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) o[r] = row_cosine<T, C>(a + r * d, b + r * d, d, static_cast<C>(eps)).cos;
  });
  return out;
}

template <typename T>
std::tuple<at::Tensor, at::Tensor> cosine_rows_backward_impl(const at::Tensor& grad, const at::Tensor& x0,
                                                             const at::Tensor& x1, double eps,
                                                             std::array<bool, 2> mask) {
  using C = std::conditional_t<std::is_same_v<T, double>, double, float>;
  const int64_t m = x0.size(0), d = x0.size(1);
  const at::Tensor g = grad.to(loss_dtype(x0.scalar_type())).contiguous();
  at::Tensor g0 = mask[0] ? at::empty_like(x0) : at::empty({0}, x0.options());
  at::Tensor g1 = mask[1] ? at::empty_like(x1) : at::empty({0}, x1.options());
  const T* a = x0.const_data_ptr<T>();
  const T* b = x1.const_data_ptr<T>();
  const C* gp = g.const_data_ptr<C>();
  T* o0 = mask[0] ? g0.data_ptr<T>() : nullptr;
  T* o1 = mask[1] ? g1.data_ptr<T>() : nullptr;
  const C ceps = static_cast<C>(eps);
  at::parallel_for(0, m, std::max<int64_t>(1, 32768 / std::max<int64_t>(d, 1)), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* xa = a + r * d;
      const T* xb = b + r * d;
      const RowCosine<C> rc = row_cosine<T, C>(xa, xb, d, ceps);
      // Coefficients of x0 and x1 in each gradient (the radial term only where the norm is not clamped).
      const C inv0 = gp[r] / rc.denom0, inv1 = gp[r] / rc.denom1;
      const C self0 = rc.norm0 >= ceps ? rc.cos / rc.denom0 : C(0);
      const C self1 = rc.norm1 >= ceps ? rc.cos / rc.denom1 : C(0);
      for (int64_t k = 0; k < d; ++k) {
        const C va = static_cast<C>(xa[k]), vb = static_cast<C>(xb[k]);
        if (o0) o0[r * d + k] = to_output<T>(inv0 * (vb / rc.denom1 - self0 * va));
        if (o1) o1[r * d + k] = to_output<T>(inv1 * (va / rc.denom0 - self1 * vb));
      }
    }
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
